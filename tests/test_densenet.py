"""DenseNet-BC: the published parameter count, the feature contract, block sizes, its config."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from ood_lightning.nn.backbones.densenet import DenseNetBC, densenet100
from tests.conftest import CONF


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _hand_count(depth: int, k: int, in_channels: int = 3, reduction: float = 0.5) -> int:
    """Parameters of DenseNet-BC without head, counted layer by layer from the paper's recipe."""
    n = (depth - 4) // 6
    bn = lambda c: 2 * c  # noqa: E731  (affine BN: weight + bias)
    total, c = in_channels * 2 * k * 9, 2 * k  # 3x3 stem to 2k channels
    for block in range(3):
        for _ in range(n):  # BN-1x1 conv to 4k, BN-3x3 conv to k
            total += bn(c) + c * 4 * k + bn(4 * k) + 4 * k * k * 9
            c += k
        if block < 2:  # BN-1x1 compression
            total += bn(c) + c * int(c * reduction)
            c = int(c * reduction)
    return total + bn(c)  # final BN


def test_parameter_count_matches_published() -> None:
    with torch.device("meta"):
        model = densenet100()
    head = 342 * 10 + 10
    # 769,162: DenseNet-BC (L=100, k=12) with a 10-class head, the paper's "0.8M".
    assert _num_params(model) == _hand_count(100, 12) == 769_162 - head == 765_732
    assert model.feature_dim == 342
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # headless
    with torch.device("meta"):
        assert _num_params(DenseNetBC(depth=40, growth_rate=12)) == _hand_count(40, 12)


def test_features_contract_and_block_sizes() -> None:
    torch.manual_seed(0)
    model = densenet100().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
    assert list(feats) == ["block1", "block2", "block3", "penultimate"]
    # Dense-block outputs before each transition: 24+16*12, 108+16*12, 150+16*12 channels.
    assert [tuple(f.shape) for f in feats.values()] == [(2, 216, 32, 32), (2, 300, 16, 16), (2, 342, 8, 8), (2, 342)]
    torch.testing.assert_close(feats["penultimate"], out)
    assert torch.isfinite(out).all() and (out >= 0).all()  # post-ReLU average pooling


def test_small_variant_trains_end_to_end_with_dropout() -> None:
    torch.manual_seed(0)
    model = DenseNetBC(depth=10, growth_rate=4, dropout=0.5, in_channels=1)
    x = torch.randn(2, 1, 16, 16)
    assert model.feature_dim == model.bn.num_features
    assert model(x).shape == (2, model.feature_dim)
    out = model(x)
    (out * torch.randn_like(out)).sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert not torch.equal(model(x), out.detach())  # dropout is active in train mode ...
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))  # ... and off in eval mode


@pytest.mark.parametrize("kwargs", [{"depth": 99}, {"depth": 4}, {"growth_rate": 0}, {"reduction": 0.0}])
def test_invalid_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="DenseNet-BC"):
        DenseNetBC(**kwargs)


def test_forward_runs_network_once() -> None:
    with torch.device("meta"):
        model = densenet100().eval()
        calls = []
        model.conv1.register_forward_hook(lambda *_: calls.append(1))
        model(torch.empty(1, 3, 32, 32))
    assert len(calls) == 1


def test_config_builds_densenet100() -> None:
    cfg = OmegaConf.create({"data": {"channels": 1}, "backbone": OmegaConf.load(CONF / "backbone" / "densenet100.yaml")})
    spec = OmegaConf.to_container(cfg.backbone, resolve=True)
    with torch.device("meta"):
        model = instantiate(spec)
    assert isinstance(model, DenseNetBC) and model.feature_dim == 342 and model.conv1.in_channels == 1
