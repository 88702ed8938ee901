"""What ``channels_last: auto`` resolves to (the table in docs/performance.md),
that the evaluation's NHWC layout keeps the extracted outputs, and that the extraction benchmark runs."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ood_lightning.core.errors import ConfigError
from ood_lightning.nn.backbones import SmallCNN
from ood_lightning.run.runtime import (
    _channels_last_input,
    apply_eval_layout,
    apply_speedups,
    resolve_channels_last,
)
from ood_lightning.scoring.passes import extract
from tests.conftest import ROOT

torch.set_num_threads(1)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("choice", "device", "stage", "expected"), [
    ("auto", CPU, "eval", True),     # the CPU evaluation default: NHWC won there (docs/performance.md)
    ("auto", CPU, "train", False),   # CPU training keeps NCHW
    ("auto", CUDA, "train", True),
    ("auto", CUDA, "eval", True),
    (True, CPU, "train", True),
    ("true", CPU, "eval", True),
    (False, CPU, "eval", False),
    (False, CUDA, "train", False),
])
def test_channels_last_resolves_as_documented(choice, device, stage, expected):
    assert resolve_channels_last(choice, device, stage) is expected


def test_the_documented_default_is_auto_and_the_docs_state_what_it_means():
    assert OmegaConf.load(ROOT / "conf" / "train.yaml").channels_last == "auto"
    row = next(line for line in (ROOT / "docs" / "performance.md").read_text().splitlines()
               if line.startswith("| `channels_last` |"))
    assert "on CUDA, and for evaluation on the CPU" in row


def test_a_bad_channels_last_value_is_one_clear_error():
    with pytest.raises(ConfigError, match="channels_last='yes': choose auto, true or false"):
        resolve_channels_last("yes", CPU, "eval")


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = SmallCNN(3, (8, 16), 16)
        self.head = nn.Linear(16, 3)

    def forward_features(self, x):
        return self.backbone.forward_features(x)

    def classify(self, f):
        return self.head(f)


def test_cpu_evaluation_runs_in_channels_last_by_default_with_the_same_outputs():
    torch.manual_seed(0)
    model = Holder().eval()
    plain = copy.deepcopy(model)
    x = torch.rand(40, 3, 16, 16)
    loader = DataLoader(TensorDataset(x, torch.zeros(40, dtype=torch.long)), batch_size=16)
    cfg = OmegaConf.create({"channels_last": "auto"})
    assert not apply_speedups(model, cfg, CPU)["channels_last"]  # training on the CPU: NCHW
    assert apply_eval_layout(model, cfg, CPU)
    assert model.backbone.block1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert apply_eval_layout(model, cfg, CPU)  # a second call adds no second hook
    hooks = [h for h in model.backbone._forward_pre_hooks.values() if h is _channels_last_input]
    assert len(hooks) == 1
    ours, ref = extract(model, loader, lambda t: t, CPU), extract(plain, loader, lambda t: t, CPU)
    assert not plain.backbone.block1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(ours.logits, ref.logits, atol=1e-5)
    for name in ref.layers:
        assert torch.allclose(ours.layers[name], ref.layers[name], atol=1e-5), name
    off = copy.deepcopy(plain)
    assert not apply_eval_layout(off, OmegaConf.create({"channels_last": False}), CPU)
    assert not off.backbone.block1[0].weight.is_contiguous(memory_format=torch.channels_last)


def _bench():
    spec = importlib.util.spec_from_file_location("extraction_speed", ROOT / "benchmarks" / "extraction_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extraction_benchmark_runs_on_a_tiny_model(tmp_path, capsys):
    """CI smoke run: a small random CNN on synthetic data (nothing from ../shared); figures only."""
    res = _bench().main(["--tiny", "--rounds", "1", "--json", str(tmp_path / "speed.json")])
    assert json.loads((tmp_path / "speed.json").read_text()) == json.loads(json.dumps(res))
    assert set(res["images_per_s"]) == {"framework/nchw", "plain/nchw", "framework/channels_last",
                                        "plain/channels_last"}
    assert res["channels_last_applied"] and res["torch_threads"] == torch.get_num_threads()
    assert all(v > 0 for v in res["images_per_s"].values())
    out = capsys.readouterr().out
    assert "framework/plain: NCHW" in out and "torch thread(s)" in out
