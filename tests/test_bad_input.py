"""Bad input, one row per case: the overrides (and any file corruption) and a fragment of the
one-line message the user must get. Every row also asserts a non-zero exit and no traceback.

Add a case with one ``Case(...)`` line in ``CASES``. ``entry`` is ``train`` or ``evaluate``
(run in-process through ``run_safely``, as ``@hydra.main`` would) or ``cli:<script>`` (a fresh
interpreter, for what happens before the task function, e.g. Hydra's own set-up).
``prepare(tmp_path)`` writes or corrupts files and returns extra overrides.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from ood_lightning.run.cli import run_safely
from ood_lightning.run.runs import train  # at import: Lightning's log handler binds to the session's stderr
from tests.conftest import TINY, compose_cfg, run_script
from tests.tiny_data import MNIST_FILES, write_mnist_raw, write_pack

#: cheap settings every in-process row adds first (a row's own overrides come after and win)
FAST = ["trainer=cpu", "debug=fast", "logger=none", "detectors=fast"]


# -- file preparations (each returns the overrides that point the run at the files) ---------
def _tiny_cifar(root: Path) -> list[str]:
    """Two tiny CIFAR-10 packs and their SHA256SUMS, as in shared/data."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    sums = []
    for split in ("train", "test"):
        write_pack(root / f"cifar10-{split}.npz", rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8),
                   np.arange(20) % 10, classes=[str(c) for c in range(10)])
        sums.append(f"{hashlib.sha256((root / f'cifar10-{split}.npz').read_bytes()).hexdigest()}  cifar10-{split}.npz\n")
    (root / "SHA256SUMS").write_text("".join(sums))
    return [f"data.root={root}", "data.val_size=4"]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_member_byte(path: Path, member: str = "jpeg.npy") -> None:
    """Flip one byte inside a stored zip member's data: the archive opens, its CRC-32 check fails."""
    with zipfile.ZipFile(path) as z:
        offset = z.getinfo(member).header_offset
    data = bytearray(path.read_bytes())
    name_len, extra_len = (int.from_bytes(data[offset + i: offset + i + 2], "little") for i in (26, 28))
    at = offset + 30 + name_len + extra_len + 200  # past the .npy header, inside the JPEG bytes
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def pack_damaged(name: str, damage: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def prepare(tmp: Path) -> list[str]:
        overrides = _tiny_cifar(tmp / "data")
        damage(tmp / "data" / name)
        return overrides
    return prepare


def mnist_damaged(name: str, damage: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def prepare(tmp: Path) -> list[str]:
        raw = write_mnist_raw(tmp / "data")
        damage(raw / name)
        return [f"data.root={tmp / 'data'}", "data.val_size=20"]
    return prepare


def read_only_run_dir(tmp: Path) -> list[str]:
    """The run folder exists and cannot be written (root ignores the mode bits: make it immutable)."""
    run = tmp / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        (run / "probe").touch()
    except OSError:
        return []
    (run / "probe").unlink()
    if subprocess.run(["chattr", "+i", str(run)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder read-only here (running as root without chattr)")
    return []


def writable_again(tmp: Path) -> None:
    subprocess.run(["chattr", "-i", str(tmp / "run")], capture_output=True)
    (tmp / "run").chmod(0o755)


#: data that is not there: a config check that passes only because it runs before any data is read
UNREAD = ["data=cifar10", "data.root=/nonexistent/ood-data"]
#: a small DHM (one flow block) and the messages of the config-check rows
DHM = [*TINY, "method=dhm", "method.flow.n_blocks=1", "method.flow.hidden=8"]
NO_CUDA = ["evaluation.device=cuda but no CUDA device", "pass evaluation.device=cpu"]
READ_ONLY = ["cannot write to the output folder", "hydra.run.dir=<a writable folder>"]
NAN_LAMBDA = ["non-finite loss", "Lower the learning rate or the weight of the density term (lambda=0.0035"]
TYPO = "error: unknown key max_epoch in trainer; did you mean max_epochs?"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@dataclass(frozen=True)
class Case:
    id: str
    overrides: list[str]
    expect: str | list[str]
    prepare: Callable[[Path], list[str]] | None = None
    entry: str = "train"
    marks: list = field(default_factory=list)
    cleanup: Callable[[Path], None] | None = None


CASES = [
    Case("npz pack truncated", ["data=cifar10"], ["cifar10-train.npz is corrupt", "sha256sum -c SHA256SUMS"],
         pack_damaged("cifar10-train.npz", truncate)),
    Case("npz pack CRC-corrupt", ["data=cifar10"], ["cifar10-test.npz is corrupt", "CRC", "&& sha256sum -c SHA256SUMS"],
         pack_damaged("cifar10-test.npz", flip_member_byte)),
    Case("npz file that is not a pack", ["data=cifar10"], ["cifar10-train.npz is corrupt", "labels"],
         pack_damaged("cifar10-train.npz", lambda p: np.savez(p, x=np.zeros(3)))),
    Case("MNIST raw file truncated", ["data=mnist"], ["train-images-idx3-ubyte is corrupt", "truncated"],
         mnist_damaged(MNIST_FILES["train"][0], truncate)),
    Case("MNIST raw labels truncated", ["data=mnist"], ["t10k-labels-idx1-ubyte is corrupt"],
         mnist_damaged(MNIST_FILES["test"][1], lambda p: truncate(p, 0.9))),
    Case("data.limit_train=0", [*UNREAD, "data.limit_train=0"], ["data.limit_train=0", ">= 1, or null"]),
    Case("data.limit_ood=0", [*UNREAD, "data.limit_ood=0"], ["data.limit_ood=0", ">= 1, or null"]),
    Case("negative limit", [*TINY, "data.limit_test=-5"], ["data.limit_test=-5", ">= 1, or null"]),
    Case("negative lambda", [*UNREAD, "method=dhm", "lambda=-1"], ["lambda=-1", "number >= 0"]),
    Case("evaluation.device=cuda without CUDA", [*UNREAD, "evaluation.device=cuda"], NO_CUDA, marks=[no_cuda]),
    Case("read-only run folder", TINY, READ_ONLY, read_only_run_dir, entry="cli:train.py", cleanup=writable_again),
    Case("NaN loss with a density term", [*DHM, "method.optimizer.lr=1e30", "detectors=none"], NAN_LAMBDA),
    Case("trainer key typo", [*TINY, "trainer.max_epoch=1"], TYPO, entry="cli:train.py"),
    Case("trainer key typo with +", [*TINY, "+trainer.max_epoch=1"], TYPO),
    Case("mistyped top-level key", [*TINY, "lamda=3.5e-3"], "error: unknown key lamda (lamda=3.5e-3); did you mean lambda?",
         entry="cli:train.py"),
    Case("mistyped evaluate.py key", ["ckpt_pth=x.ckpt"], "error: unknown key ckpt_pth (ckpt_pth=x.ckpt); did you mean ckpt_path?",
         entry="cli:evaluate.py"),
    # every key a run reads, checked in one pass before any data is read (UNREAD: the data is not there)
    Case("data.batch_size=0", [*UNREAD, "data.batch_size=0"], "data.batch_size=0: must be a whole number >= 1"),
    Case("negative learning rate", [*UNREAD, "method.optimizer.lr=-1"], "method.optimizer.lr=-1: must be a number > 0"),
    Case("seed=abc", [*UNREAD, "seed=abc"], "seed=abc: must be a whole number"),
    Case("data.num_workers=-1", [*UNREAD, "data.num_workers=-1"], "data.num_workers=-1: must be a whole number >= 0"),
    Case("ood=[]", [*UNREAD, "ood=[]"], ["ood=[] chooses no OOD set", "pass ood=none"]),
    Case("data.known_classes=[]", [*UNREAD, "data.known_classes=[]"],
         ["data.known_classes=[]: must be null (all classes) or a non-empty list", "cifar10 (0..9)"]),
    Case("data.known_classes=[42]", [*UNREAD, "data.known_classes=[42]"], ["data.known_classes=[42]", "cifar10 (0..9)"]),
    Case("repeated known class", [*UNREAD, "data.known_classes=[1,1]"], ["data.known_classes=[1, 1]", "distinct"]),
    Case("read-only paths.cache_dir", UNREAD, ["cannot write to paths.cache_dir=", "pass paths.cache_dir=<a writable folder>"],
         lambda tmp: [f"paths.cache_dir={_immutable(tmp / 'cache')}"], cleanup=lambda tmp: _mutable(tmp / "cache")),
    Case("evaluation.tpr=1.5", [*UNREAD, "evaluation.tpr=1.5"], ["evaluation.tpr=1.5", "between 0 and 1"]),
    Case("unknown detector _target_", [*UNREAD, "+detectors.bad._target_=ood_lightning.detectors.MSPP"],
         "detectors.bad._target_=ood_lightning.detectors.MSPP: no such class or function; did you mean "
         "ood_lightning.detectors.MSP?"),
    Case("evaluation.f1_threshold=bogus", [*UNREAD, "evaluation.f1_threshold=bogus"],
         "evaluation.f1_threshold=bogus: must be auto or one of id_val, id_train"),
    Case("ood.gaussian.n=0", [*UNREAD, "ood=noise", "ood.gaussian.n=0"], "ood.gaussian.n=0: must be a whole number >= 1"),
    Case("backbone.spectral_coeff=0", [*UNREAD, "backbone.spectral_coeff=0"], "backbone.spectral_coeff=0: must be a number > 0"),
    Case("method.spectral_coeff=0", [*UNREAD, "method=dhm", "method.spectral_coeff=0"],
         "method.spectral_coeff=0: must be a number > 0"),
    Case("trainer.max_epochs=0", [*UNREAD, "trainer.max_epochs=0"],
         ["trainer.max_epochs=0 would score an untrained network", "trainer.max_epochs >= 1"]),
    # evaluate.py checks the same keys before it reads the checkpoint (which is not there either)
    Case("evaluate.py evaluation.tpr=0", ["ckpt_path=/nonexistent/last.ckpt", "evaluation.tpr=0"],
         "evaluation.tpr=0", entry="evaluate"),
    Case("evaluate.py unknown detector", ["ckpt_path=/nonexistent/last.ckpt", "+detectors.bad._target_=nope.Nope"],
         "detectors.bad._target_=nope.Nope: no such class or function", entry="evaluate"),
]


def _immutable(path: Path) -> Path:
    """A folder nothing can be written to (root ignores the mode bits: chattr +i)."""
    path.mkdir(parents=True)
    path.chmod(0o555)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0 and os.geteuid() == 0:
        pytest.skip("cannot make a folder read-only here (running as root without chattr)")
    return path


def _mutable(path: Path) -> None:
    subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)


def _run_in_process(entry: str, overrides: list[str], out: Path, capsys) -> tuple[int | None, str]:
    if entry == "train":
        fn = train
    else:
        from evaluate import evaluate as fn
    cfg = compose_cfg(entry, overrides, out)
    capsys.readouterr()
    code = 0
    try:
        run_safely(fn, cfg)
    except SystemExit as exit_:
        code = exit_.code
    except Exception:  # what the user would see as a traceback
        return 1, capsys.readouterr().err + traceback.format_exc()
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_gives_one_clear_line(case: Case, tmp_path, capsys):
    fast = FAST if "evaluate" not in case.entry else ["logger=none", "detectors=fast"]
    overrides = [*fast, f"paths.cache_dir={tmp_path / 'cache'}", *case.overrides]
    try:
        if case.prepare is not None:
            overrides += case.prepare(tmp_path)
        if case.entry.startswith("cli:"):
            res = run_script(case.entry.removeprefix("cli:"), *overrides, f"hydra.run.dir={tmp_path / 'run'}")
            code, err = res.returncode, res.stderr
        else:
            code, err = _run_in_process(case.entry, overrides, tmp_path / "run", capsys)
    finally:
        if case.cleanup is not None:
            case.cleanup(tmp_path)
    assert "Traceback" not in err, err[-3000:]
    assert code != 0, err[-3000:]
    for fragment in [case.expect] if isinstance(case.expect, str) else case.expect:
        assert fragment in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]  # one line


def test_typo_check_passes_every_real_key_and_names_unknown_ones():
    from ood_lightning.run.typos import unknown_key

    fine = ["lambda=1e-3", "data=cifar10", "+foo=1", "~callbacks.progress_bar", "hydra.run.dir=x", "-m", "seed=0,1",
            "data.batch_size=3", "method/flow=glow", "experiment=dhm_tiny", "debug=fast", "trainer.max_epochs=2"]
    assert unknown_key(fine, "train") is None
    assert unknown_key(["run_dir=x", "compare=[a,b]", "ckpt_path=y", "detectors=all", "ood=[noise]", "plot=lambda"],
                       "evaluate") is None
    assert unknown_key(["evalutaion.tpr=0.9"], "train").startswith("unknown key evalutaion (evalutaion.tpr=0.9); did you "
                                                                  "mean evaluation?")
    assert "the top-level keys are: allow_unsafe_checkpoint, backbone," in unknown_key(["zzz=1"], "train")
    assert unknown_key(["method=dhm"], "evaluate").startswith("unknown key method")  # evaluate.py builds no method


# -- an OOD set drawn from the ID classes: warned about and marked in metrics.json -----------------

def test_ood_sets_that_hold_id_classes_are_found(tmp_path):
    from ood_lightning.run.checks import ood_overlapping_id

    same = "+ood.same={dataset: mnist, split: test, classes: [0,1,2,3,4,5]}"
    some = "+ood.some={dataset: mnist, split: test, classes: [4,5,6,7]}"
    other = "+ood.other={dataset: mnist, split: test, classes: [6,7]}"
    whole = "+ood.whole={dataset: mnist, split: test}"
    cfg = compose_cfg("train", ["data=mnist6", "ood=[near,noise]", same, some, other, whole], tmp_path)
    assert ood_overlapping_id(cfg) == {"same": [0, 1, 2, 3, 4, 5], "some": [4, 5], "whole": [0, 1, 2, 3, 4, 5]}
    cfg = compose_cfg("train", ["data=mnist", "ood=noise", other], tmp_path)  # every class is ID
    assert ood_overlapping_id(cfg) == {"other": [6, 7]}


def test_overlapping_ood_set_is_warned_and_marked(tmp_path, caplog):
    import json
    import logging

    same = "+ood.same={dataset: stripes, split: test, n: 300}"  # the ID test distribution itself
    cfg = compose_cfg("train", [*TINY, *FAST, same], tmp_path)
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert "OOD set 'same' holds ID classes of stripes (all)" in caplog.text
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["ood_overlaps_id"] == {"same": "all"}
    assert abs(metrics["results"]["msp"]["same"]["auroc"] - 0.5) < 0.1  # indeed not OOD: chance level


# -- SIGTERM and Ctrl-C: one line naming the folder, checkpoint and command; failed.json says why ----

class SignalAt(L.Callback):
    """Sends this process ``signum`` after training batch ``batch`` of epoch ``epoch`` (Ctrl-C, a scheduler)."""

    def __init__(self, signum: int, epoch: int, batch: int = 0):
        self.signum, self.epoch, self.batch = signum, epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


def _stopped(fn, cfg, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_safely(fn, cfg)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return exit_.value.code, errors[0]


def test_ctrl_c_in_training_is_one_line_with_folder_checkpoint_and_resume_command(tmp_path, capsys):
    import json

    stop = f"+callbacks.stop={{_target_: {__name__}.SignalAt, signum: {int(signal.SIGINT)}, epoch: 1}}"
    cfg = compose_cfg("train", [*TINY, *FAST, "trainer.max_epochs=3", "callbacks.progress_bar=null", stop], tmp_path)
    code, line = _stopped(train, cfg, capsys)
    last = tmp_path / "checkpoints" / "last.ckpt"  # epoch 0's: Ctrl-C stops at once, no new checkpoint
    assert code == 130
    assert line.startswith(f"error: interrupted (Ctrl-C); run folder {tmp_path} (failed.json marks it interrupted); "
                           f"checkpoint {last}; resume with: python ")
    assert f"ckpt_path={last}" in line and f"hydra.run.dir={tmp_path}" in line
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert failed["reason"] == "interrupted" and failed["checkpoint"] == str(last)
    assert not (tmp_path / "metrics.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back


def test_a_second_sigterm_stops_at_once(tmp_path, capsys):
    import json

    class Twice(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            if batch_idx == 0:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = compose_cfg("train", [*TINY, *FAST, "callbacks.progress_bar=null"], tmp_path)
    from ood_lightning.run import runs

    original = runs.build_trainer
    runs.build_trainer = lambda *a, extra_callbacks=(), **k: original(*a, extra_callbacks=[*extra_callbacks, Twice()], **k)
    try:
        code, line = _stopped(train, cfg, capsys)
    finally:
        runs.build_trainer = original
    assert code == 143 and line.startswith("error: terminated by SIGTERM; run folder")
    assert "no checkpoint yet" in line  # stopped inside the first step: no terminated.ckpt written
    assert json.loads((tmp_path / "failed.json").read_text())["reason"] == "terminated"


@pytest.mark.parametrize("signum, code, reason", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_while_evaluate_scores_is_one_line_and_failed_json(tmp_path, capsys, monkeypatch, signum, code, reason):
    import json

    from evaluate import evaluate
    from ood_lightning.run import runs

    trained = tmp_path / "trained"
    train(compose_cfg("train", [*TINY, *FAST, "detectors=none"], trained))

    def scoring(*args, **kwargs):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not stop the scoring")

    monkeypatch.setattr(runs, "score_all", scoring)
    out = tmp_path / "eval"
    cfg = compose_cfg("evaluate", [f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", "detectors=fast"], out)
    got, line = _stopped(evaluate, cfg, capsys)
    assert got == code
    assert f"run folder {out} (failed.json marks it {reason}); scoring had not finished; re-run with: python " in line
    assert "evaluate.py ckpt_path=" in line
    assert json.loads((out / "failed.json").read_text())["reason"] == reason
    assert not (out / "metrics.json").exists()


# -- a full disk: the earlier checkpoint survives, one line, the record goes to stderr ------------------

def test_disk_full_while_checkpointing_keeps_the_earlier_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    import ood_lightning.core.io

    out = tmp_path / "run"
    train(compose_cfg("train", [*TINY, *FAST, "detectors=none"], out))
    last = out / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ood_lightning.core.io.os, "fsync", full)  # every atomic write fails as a full disk fails
    cfg = compose_cfg("train", [*TINY, *FAST, "detectors=none", "trainer.max_epochs=2", f"ckpt_path={last}"], out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_safely(train, cfg)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f"error: no space left on the device of {last.parent} while writing last.ckpt (")
    size = len(before) / 2**10  # the new checkpoint is the same network: about the same size
    needed = float(errors[0].split(" while writing last.ckpt (")[1].split(" KiB needed")[0])
    assert 0.8 * size < needed < 1.2 * size, errors[0]
    assert last.read_bytes() == before  # byte-identical
    assert not [p for p in last.parent.iterdir() if p.name != "last.ckpt"]  # no temporary left behind
    assert not (out / "failed.json").exists()  # that write failed too: the record is on stderr
    assert f"could not write {out / 'failed.json'}" in err and '"error": "DiskFullError: no space left' in err


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_on_a_real_small_filesystem(tmp_path):
    """A real full disk (a tmpfs filled up after the first run): train.py resumes, cannot write its
    checkpoint, exits 1 with one line; the earlier last.ckpt is byte-identical."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = disk / "run"
        args = [*TINY, "logger=none", "detectors=none", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"]
        assert run_script("train.py", *args).returncode == 0
        last = run / "checkpoints" / "last.ckpt"
        before = last.read_bytes()
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * max(0, free - len(before) // 2))  # room for logs, not a checkpoint
        res = run_script("train.py", *args, "trainer.max_epochs=2", f"ckpt_path={last}")
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"no space left on the device of {last.parent}" in errors[0], res.stderr[-3000:]
        assert last.read_bytes() == before
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
