"""Bad input, one row per case: the overrides (and any file corruption) and a fragment of the
one-line message the user must get. Every row also asserts a non-zero exit and no traceback.

Add a case with one ``Case(...)`` line in ``CASES``. ``entry`` is ``train`` or ``evaluate``
(run in-process through ``run_safely``, as ``@hydra.main`` would) or ``cli:<script>`` (a fresh
interpreter, for what happens before the task function, e.g. Hydra's own set-up).
``prepare(tmp_path)`` writes or corrupts files and returns extra overrides.
"""

from __future__ import annotations

import hashlib
import subprocess
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from ood_lightning.assembly.cli import run_safely
from ood_lightning.assembly.runs import train  # at import: Lightning's log handler binds to the session's stderr
from tests.conftest import TINY, compose_cfg, run_script
from tests.tiny_data import MNIST_FILES, write_mnist_raw, write_pack

#: cheap settings every in-process row adds first (a row's own overrides come after and win)
FAST = ["trainer=cpu", "debug=fast", "logger=none", "detectors=fast"]


# -- file preparations (each returns the overrides that point the run at the files) ---------
def _tiny_cifar(root: Path) -> list[str]:
    """Two tiny lossless CIFAR-10 packs and their SHA256SUMS, as in shared/data."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    sums = []
    for split in ("train", "test"):
        name = f"cifar10-lossless-{split}.npz"
        write_pack(root / name, rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8),
                   np.arange(20) % 10, classes=[str(c) for c in range(10)], fmt="png")
        sums.append(f"{hashlib.sha256((root / name).read_bytes()).hexdigest()}  {name}\n")
    (root / "SHA256SUMS").write_text("".join(sums))
    return [f"data.root={root}", "data.val_size=4"]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_member_byte(path: Path, member: str = "png.npy") -> None:
    """Flip one byte inside a stored zip member's data: the archive opens, its CRC-32 check fails."""
    with zipfile.ZipFile(path) as z:
        offset = z.getinfo(member).header_offset
    data = bytearray(path.read_bytes())
    name_len, extra_len = (int.from_bytes(data[offset + i: offset + i + 2], "little") for i in (26, 28))
    at = offset + 30 + name_len + extra_len + 200  # past the .npy header, inside the PNG bytes
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
    Case("npz pack truncated", ["data=cifar10"], ["cifar10-lossless-train.npz is corrupt", "sha256sum -c SHA256SUMS"],
         pack_damaged("cifar10-lossless-train.npz", truncate)),
    Case("npz pack CRC-corrupt", ["data=cifar10"], ["cifar10-lossless-test.npz is corrupt", "CRC",
                                                    "&& sha256sum -c SHA256SUMS"],
         pack_damaged("cifar10-lossless-test.npz", flip_member_byte)),
    Case("npz file that is not a pack", ["data=cifar10"], ["cifar10-lossless-train.npz is corrupt", "labels"],
         pack_damaged("cifar10-lossless-train.npz", lambda p: np.savez(p, x=np.zeros(3)))),
    Case("pack without image files", ["data=cifar10"], ["cifar10-lossless-test.npz is corrupt",
                                                        "holds neither of png, jpeg"],
         pack_damaged("cifar10-lossless-test.npz", lambda p: np.savez(p, labels=np.zeros(3, np.int64),
                                                                      classes=np.array(["a"]), offsets=np.zeros(4)))),
    Case("JPEG copy asked for but absent", ["data=cifar10_jpeg"], ["cifar10_jpeg", "not found", "cifar10-train.npz"],
         _tiny_cifar),
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
]


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
    overrides = [*FAST, f"paths.cache_dir={tmp_path / 'cache'}", *case.overrides]
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
