"""Reading checkpoint files: nothing in a file runs, bad files give one line, third-party layouts
load to the same network, and a mismatch names counts and first keys in a readable line."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from ood_lightning.core.checkpoints import OPT_IN, load_state_strict, read_checkpoint, to_project_layout
from ood_lightning.core.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    InvalidCheckpointError,
    UnsafeCheckpointError,
)
from ood_lightning.core.pretrained import models_root
from ood_lightning.nn.backbones import CifarResNet
from ood_lightning.run.build import build_model
from ood_lightning.run.runs import train
from tests.conftest import ROOT, TINY, compose_cfg, run_script


class Evil:
    """Unpickling this creates ``marker``: the stand-in for a checkpoint that runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class Note:
    """A harmless class that only full unpickling rebuilds (the opt-in's test case)."""

    def __init__(self, text: str):
        self.text = text


def _evil_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    marker = tmp_path / "MARKER"
    files = [tmp_path / "evil.ckpt", tmp_path / "evil_legacy.ckpt", tmp_path / "evil.pkl"]
    payload = {"state_dict": {"x": torch.zeros(1)}, "ood_lightning_config": {}, "extra": Evil(marker)}
    torch.save(payload, files[0])
    torch.save(payload, files[1], _use_new_zipfile_serialization=False)
    files[2].write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    return marker, files


# -- read_checkpoint -----------------------------------------------------------------------

def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker, files = _evil_files(tmp_path)
    for path in files:
        with pytest.raises((UnsafeCheckpointError, InvalidCheckpointError)) as err:
            read_checkpoint(path)
        assert not marker.exists(), path
        assert "\n" not in str(err.value)
    with pytest.raises(UnsafeCheckpointError, match=rf"needs full unpickling \(it holds (io|builtins)\.open, .*can run arbitrary code.*{OPT_IN}=true"):
        read_checkpoint(files[0])


def test_opt_in_reads_a_trusted_file_that_needs_full_unpickling(tmp_path):
    path = tmp_path / "note.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "note": Note("hello")}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"holds (tests\.)?test_checkpoints\.Note"):
        read_checkpoint(path, key="backbone.checkpoint")
    state = read_checkpoint(path, allow_unsafe=True)
    assert state["note"].text == "hello" and torch.equal(state["state_dict"]["w"], torch.ones(2))


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {f"w{i}": torch.randn(64, 64) for i in range(4)}}, good)
    legacy = tmp_path / "good_legacy.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256, 256)}}, legacy, _use_new_zipfile_serialization=False)
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "truncated_header": data[:100],
        "truncated_legacy": legacy.read_bytes()[: legacy.stat().st_size // 2],
        "garbage": b"this is not a checkpoint\n" * 20,
        "random": os.urandom(4096),
        "empty": b"",
    }
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}.ckpt"
        out[name].write_bytes(content)
    return out


def test_truncated_and_garbage_files_are_one_line_not_a_valid_checkpoint(tmp_path):
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(InvalidCheckpointError) as err:
            read_checkpoint(path)
        text = str(err.value)
        assert text.startswith(f"not a valid checkpoint: {path} (") and text.endswith(")"), (name, text)
        assert "\n" not in text and len(text) < 250, (name, text)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(InvalidCheckpointError, match=r"holds a Tensor, not a dict"):
        read_checkpoint(tensor)


def test_missing_file_says_where_it_looked_and_where_to_get_known_weights(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=rf"ckpt_path=.*no such file \(looked for {tmp_path}/nope.ckpt\); pass x"):
        read_checkpoint(tmp_path / "nope.ckpt", key="ckpt_path", hint="pass x")
    path = tmp_path / "cifar10-resnet-he2016" / "resnet56-4bfd9763.th"
    with pytest.raises(CheckpointNotFoundError) as err:
        read_checkpoint(path, key="backbone.checkpoint")
    text = str(err.value)
    assert f"looked for {path}" in text and f"the models root is {models_root()}" in text
    assert "akamaster/pytorch_resnet_cifar10" in text and "resnet56-4bfd9763.th" in text and "\n" not in text


def test_models_root_env_then_shared_then_project(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    import ood_lightning.run.config  # noqa: F401  (resolvers)

    monkeypatch.setenv("OOD_LIGHTNING_MODELS", str(tmp_path))
    assert models_root() == str(tmp_path)
    assert OmegaConf.create({"m": "${ood_models_root:}/x.th"}).m == f"{tmp_path}/x.th"
    monkeypatch.delenv("OOD_LIGHTNING_MODELS")
    shared = ROOT.parent / "shared" / "models"
    assert models_root() == (str(shared) if shared.is_dir() else str(ROOT / "models"))


def test_allow_unsafe_checkpoint_is_a_false_top_level_key_of_both_entrypoints():
    for name in ("train", "evaluate"):
        assert compose_cfg(name, [], "/tmp/unused")[OPT_IN] is False


# -- layouts -------------------------------------------------------------------------------

def _reference(seed: int = 0) -> tuple[CifarResNet, nn.Linear]:
    """A ResNet-20 and head with random weights *and* BN statistics, so a load that misses any
    tensor changes the outputs."""
    torch.manual_seed(seed)
    net, head = CifarResNet(depth=20), nn.Linear(64, 10)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval(), head


def _third_party_layouts(net: nn.Module, head: nn.Linear) -> dict[str, dict]:
    plain = {**net.state_dict(), **{f"linear.{k}": v for k, v in head.state_dict().items()}}
    return {
        "plain": plain,
        "state_dict key": {"state_dict": plain, "best_prec1": 91.78},
        "module. prefix": {"state_dict": {f"module.{k}": v for k, v in plain.items()}},
        "fc head": {k.replace("linear.", "fc.", 1) if k.startswith("linear.") else k: v for k, v in plain.items()},
        "project (Lightning)": {"state_dict": {**{f"backbone.{k}": v for k, v in net.state_dict().items()},
                                               **{f"head.{k}": v for k, v in head.state_dict().items()}},
                                "epoch": 3},
    }


def test_every_layout_loads_to_identical_outputs(tmp_path):
    net, head = _reference()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        truth = head(net(x))
    outputs = []
    for name, state in _third_party_layouts(net, head).items():
        path = tmp_path / f"layout{len(outputs)}.th"
        torch.save(state, path)
        cfg = compose_cfg("train", ["backbone=cifar_resnet20", "data=cifar10", "method=posthoc",
                                    f"backbone.checkpoint={path}"], tmp_path / "run")
        model = build_model(cfg, 10).eval()
        with torch.no_grad():
            outputs.append(model(x))
        assert torch.equal(outputs[-1], truth), name
    fresh = build_model(compose_cfg("train", ["backbone=cifar_resnet20", "data=cifar10", "method=classifier"],
                                    tmp_path / "run"), 10).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), truth, atol=1e-3)  # loading is what made them equal


def test_layout_mapping_names():
    w = torch.zeros(1)
    assert to_project_layout({"module.conv1.weight": w, "module.linear.bias": w}) == {
        "backbone.conv1.weight": w, "head.bias": w}
    assert set(to_project_layout({"state_dict": {"fc.weight": w, "layer1.0.conv1.weight": w}})) == {
        "head.weight", "backbone.layer1.0.conv1.weight"}
    project = {"backbone.fc.weight": w, "head.weight": w, "flow.t.weight": w}
    assert to_project_layout({"state_dict": project}) == project
    # a backbone's own fc layer (the small CNN's) is not a head
    assert set(to_project_layout({"fc.weight": w, "conv.weight": w}, backbone_keys={"fc.weight", "conv.weight"})) == {
        "backbone.fc.weight", "backbone.conv.weight"}
    with pytest.raises(InvalidCheckpointError, match=r"no state_dict: 'best_prec1' holds a float"):
        to_project_layout({"best_prec1": 91.0, "net": {}}, source="f.th")
    with pytest.raises(InvalidCheckpointError, match="two entries map to head.weight"):
        to_project_layout({"fc.weight": w, "linear.weight": w})


def test_old_files_without_num_batches_tracked_load():
    net, _ = _reference()
    old = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    other = CifarResNet(depth=20)
    load_state_strict(other, old, "old.th", "backbone")
    torch.testing.assert_close(other.eval()(torch.ones(1, 3, 32, 32)), net(torch.ones(1, 3, 32, 32)))


# -- mismatch message ----------------------------------------------------------------------

def test_mismatch_message_is_short_with_counts_and_first_keys():
    small, big = CifarResNet(depth=20).state_dict(), CifarResNet(depth=56)
    missing = [k for k in big.state_dict() if k not in small and not k.endswith("num_batches_tracked")]  # torch fills those
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_strict(big, small, "r20.th", "backbone")
    text = str(err.value)
    assert f"r20.th does not match the configured backbone: {len(missing)} missing keys ({', '.join(missing[:5])}, ...)" in text
    assert "unexpected" not in text and "\n" not in text and len(text) < 600
    grey = CifarResNet(depth=20, in_channels=1)
    extra = {**small, "linear.weight": torch.zeros(10, 64)}
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_strict(grey, extra, "r20.th", "backbone")
    text = str(err.value)
    assert "1 unexpected key (linear.weight)" in text
    assert "1 size mismatch (conv1.weight: file [16, 3, 3, 3] vs model [16, 1, 3, 3])" in text
    assert "missing" not in text and text.endswith("(its config is in the run's .hydra/config.yaml)")


# -- the three entry paths -----------------------------------------------------------------

def test_malicious_checkpoint_refused_by_every_entry_path_in_process(tmp_path):
    from ood_lightning.run.runs import rescore

    marker, files = _evil_files(tmp_path)
    tiny_posthoc = [o for o in TINY if o != "debug=fast"] + ["debug=fast", "method=posthoc"]
    for path in files[:2]:
        with pytest.raises(UnsafeCheckpointError, match="backbone.checkpoint=.*needs full unpickling"):
            train(compose_cfg("train", [*tiny_posthoc, f"backbone.checkpoint={path}"], tmp_path / "a"))
        with pytest.raises(UnsafeCheckpointError, match="ckpt_path=.*needs full unpickling"):
            train(compose_cfg("train", [*TINY, f"ckpt_path={path}"], tmp_path / "b"))
        with pytest.raises(UnsafeCheckpointError, match="ckpt_path=.*needs full unpickling"):
            rescore(compose_cfg("evaluate", [f"ckpt_path={path}"], tmp_path / "c"))
    assert not marker.exists()


def test_bad_checkpoints_are_one_clear_error_in_process(tmp_path):
    from ood_lightning.run.runs import rescore

    bad = _bad_files(tmp_path)
    tiny_posthoc = [o for o in TINY if o != "debug=fast"] + ["debug=fast", "method=posthoc"]
    with pytest.raises(InvalidCheckpointError, match=rf"not a valid checkpoint: {bad['garbage']} \("):
        train(compose_cfg("train", [*tiny_posthoc, f"backbone.checkpoint={bad['garbage']}"], tmp_path / "a"))
    with pytest.raises(InvalidCheckpointError, match=rf"not a valid checkpoint: {bad['truncated']} \("):
        rescore(compose_cfg("evaluate", [f"ckpt_path={bad['truncated']}"], tmp_path / "b"))


@pytest.mark.slow
def test_entrypoints_refuse_malicious_and_bad_checkpoints_with_one_line(tmp_path):
    """As a user runs them: exit 1, one 'error:' line, no traceback, and the marker never appears."""
    marker, files = _evil_files(tmp_path)
    bad = _bad_files(tmp_path)
    # one run per entrypoint and per error class (each run costs a fresh interpreter); every entry
    # path of each error is covered in process above and in test_bad_checkpoints_are_one_clear_error_in_process
    runs = [
        (["train.py", *TINY, "method=posthoc", f"backbone.checkpoint={files[0]}"], "needs full unpickling"),
        (["evaluate.py", f"ckpt_path={bad['truncated']}"], f"not a valid checkpoint: {bad['truncated']} ("),
    ]
    for i, (args, message) in enumerate(runs):
        res = run_script(*args, f"hydra.run.dir={tmp_path / f'run{i}'}")
        assert res.returncode == 1, (args, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, res.stderr[-2000:]
        errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], res.stderr[-2000:]
    assert not marker.exists()


@pytest.mark.slow
def test_a_real_run_checkpoint_reads_weights_only_and_resumes(tmp_path):
    """The framework's own last.ckpt needs nothing beyond tensors and plain containers, also when
    Lightning reloads it to resume (trainer.fit(weights_only=True)); a truncated copy is one line."""
    out = tmp_path / "run"
    train(compose_cfg("train", [*TINY, "detectors=none"], out))
    ckpt = out / "checkpoints" / "last.ckpt"
    state = read_checkpoint(ckpt)
    assert {"state_dict", "optimizer_states", "ood_lightning_config"} <= set(state)
    train(compose_cfg("train", [*TINY, "detectors=none", "trainer.max_epochs=2", f"ckpt_path={ckpt}"], tmp_path / "resumed"))
    resumed = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert resumed["epoch"] == 1 and resumed["global_step"] == 2 * state["global_step"] > 0
    cut = tmp_path / "cut.ckpt"
    shutil.copy(ckpt, cut)
    cut.write_bytes(cut.read_bytes()[:-1000])
    with pytest.raises(InvalidCheckpointError, match=rf"not a valid checkpoint: {cut} \("):
        train(compose_cfg("train", [*TINY, f"ckpt_path={cut}"], tmp_path / "c"))
