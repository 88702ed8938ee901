"""Backbone contract: shapes, named features, published parameter counts, gradient flow."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException
from torch import nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.nn.backbones import ResidualMLP, SmallCNN, WideResNet, resnet18, resnet34
from ood_lightning.run.build import build_backbone as build_from_config
from tests.conftest import compose_cfg

NUM_CLASSES = 10
#: the data config that sets each backbone's input channels (``in_channels: ${data.channels}``)
_DATA = {"cnn": "mnist", "mlp2d": "moons"}


def build_backbone(name: str, **overrides) -> nn.Module:
    """The backbone exactly as train.py builds it from ``conf/backbone/<name>.yaml``."""
    cfg = compose_cfg("train", [f"backbone={name}", f"data={_DATA.get(name, 'cifar10')}",
                                *(f"backbone.{k}={v}" for k, v in overrides.items())], "/tmp/unused")
    return build_from_config(cfg)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _first_layer(model: nn.Module) -> nn.Module:
    """The layer that touches the input: a gradient here has flowed back through the whole network."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return m
    raise AssertionError("no conv/linear layer found")


# Published totals for the 10-class CIFAR models, including their final Linear classifier:
# WRN-28-10 36.5M (Zagoruyko & Komodakis 2016), WRN-28-2 1.47M,
# CIFAR ResNet-18 11.17M and ResNet-34 21.28M (kuangliu/pytorch-cifar style).
PUBLISHED_TOTALS = {
    "wrn28_10": 36.5e6,
    "wrn28_2": 1.47e6,
    "resnet18": 11.17e6,
    "resnet34": 21.28e6,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_parameter_count_matches_published_minus_head(name: str) -> None:
    with torch.device("meta"):  # no memory or init cost, even for 36M parameters
        model = build_backbone(name)
    head = model.feature_dim * NUM_CLASSES + NUM_CLASSES  # Linear(feature_dim, 10) weights + bias
    expected = PUBLISHED_TOTALS[name] - head
    assert _num_params(model) == pytest.approx(expected, rel=0.01)
    # The head is removed, not merely small: no Linear mapping to the class count remains.
    assert not any(isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES for m in model.modules())


def test_wrn_feature_dim_is_64_times_width() -> None:
    with torch.device("meta"):
        assert WideResNet(depth=28, width=10).feature_dim == 640
        assert WideResNet(depth=28, width=2).feature_dim == 128
        assert WideResNet(depth=16, width=4).feature_dim == 256


# (registry name, constructor overrides, input shape, expected feature_dim)
SMALL_CASES = [
    ("wrn28_2", {}, (2, 3, 32, 32), 128),
    ("resnet18", {}, (2, 3, 32, 32), 512),
    ("cnn", {}, (2, 1, 28, 28), 128),
    ("cnn", {"in_channels": 3}, (2, 3, 32, 32), 128),
    ("cnn", {"feature_dim": 64}, (2, 1, 32, 32), 64),
    ("mlp2d", {}, (4, 2), 128),
    ("mlp2d", {"hidden": 32, "depth": 3}, (4, 2), 32),
]
EXPECTED_KEYS = {
    "wrn28_2": ["block1", "block2", "block3", "penultimate"],
    "resnet18": ["block1", "block2", "block3", "penultimate"],
    "cnn": ["block1", "block2", "block3", "penultimate"],
}


def _case_id(case: tuple) -> str:
    name, kw, shape, _ = case
    return f"{name}-{'x'.join(map(str, shape[1:]))}" + ("-" + ",".join(f"{k}={v}" for k, v in kw.items()) if kw else "")


@pytest.mark.parametrize("case", SMALL_CASES, ids=_case_id)
def test_forward_shape_and_features_contract(case: tuple) -> None:
    name, kwargs, shape, feature_dim = case
    torch.manual_seed(0)
    model = build_backbone(name, **kwargs).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
    assert model.feature_dim == feature_dim
    assert out.shape == (shape[0], feature_dim)
    assert torch.isfinite(out).all()
    mlp_keys = [f"block{i}" for i in range(1, kwargs.get("depth", 6) + 1)] + ["penultimate"]
    expected_keys = EXPECTED_KEYS.get(name, mlp_keys)
    assert list(feats) == expected_keys
    torch.testing.assert_close(feats["penultimate"], out)
    # Intermediate outputs really are distinct tensors of the batch, not aliases of the output.
    for key in expected_keys[:-1]:
        assert feats[key].shape[0] == shape[0]
        assert feats[key].data_ptr() != out.data_ptr()


def test_wrn28_10_forward_and_block_spatial_sizes() -> None:
    torch.manual_seed(0)
    model = WideResNet(depth=28, width=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)  # one real pass of batch 1 only: WRN-28-10 is ~5 GFLOPs per image
    assert list(feats) == ["block1", "block2", "block3", "penultimate"]
    assert feats["block1"].shape == (1, 160, 32, 32)
    assert feats["block2"].shape == (1, 320, 16, 16)
    assert feats["block3"].shape == (1, 640, 8, 8)
    assert feats["penultimate"].shape == (1, 640)
    # Penultimate is post-ReLU global average pooling, so it is non-negative.
    assert (feats["penultimate"] >= 0).all()


def test_resnet34_shapes_on_meta_device() -> None:
    """Same block code as resnet18 (tested for real); meta tensors check the deeper wiring for free."""
    with torch.device("meta"):
        model = resnet34().eval()
        x = torch.empty(2, 3, 32, 32)
        feats = model.forward_features(x)
        out = model(x)
    assert list(feats) == ["block1", "block2", "block3", "penultimate"]
    assert [tuple(f.shape) for f in feats.values()] == [
        (2, 64, 32, 32),
        (2, 128, 16, 16),
        (2, 256, 8, 8),
        (2, 512),
    ]
    assert out.shape == (2, 512)


@pytest.mark.parametrize(
    ("model_fn", "input_shape", "expected"),
    [
        (resnet18, (1, 3, 32, 32), [(64, 32), (128, 16), (256, 8)]),  # block4 only as the pooled penultimate
        (SmallCNN, (1, 1, 28, 28), [(32, 14), (64, 7), (128, 3)]),
    ],
    ids=["resnet18-32px", "cnn-28px"],
)
def test_block_spatial_sizes(model_fn, input_shape: tuple[int, ...], expected: list[tuple[int, int]]) -> None:
    model = model_fn().eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(input_shape))
    got = [(f.shape[1], f.shape[-1]) for k, f in feats.items() if k != "penultimate"]  # (channels, width)
    assert got == expected


@pytest.mark.parametrize("depth", [27, 30, 4])
def test_wrn_invalid_depth_raises(depth: int) -> None:
    with pytest.raises(ValueError, match=rf"6n\+4.*depth={depth}"):
        WideResNet(depth=depth, width=2)


def test_wrn_depth_error_through_the_config() -> None:
    with pytest.raises(InstantiationException) as info:  # Hydra wraps it; train.py unwraps it
        build_backbone("wrn28_2", depth=29)
    assert isinstance(info.value.__cause__, ConfigError) and "backbone.depth" in str(info.value.__cause__)


@pytest.mark.parametrize("name", ["wrn28_2", "resnet18", "cnn", "mlp2d"])
def test_gradients_reach_first_layer(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name).train()
    x = torch.randn(4, 2) if name == "mlp2d" else torch.randn(2, 1 if name == "cnn" else 3, 32, 32)
    out = model(x)
    # A random projection as loss avoids the degenerate zero gradient of BN under out.sum().
    loss = (out * torch.randn_like(out)).sum()
    loss.backward()
    grad = _first_layer(model).weight.grad
    assert grad is not None
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["wrn28_2", "resnet34", "cnn", "mlp2d"])
def test_forward_runs_network_once(name: str) -> None:
    """forward must reuse forward_features's computation, not run the network twice."""
    with torch.device("meta"):  # only the call count matters, so skip the arithmetic
        model = build_backbone(name).eval()
        x = torch.empty(1, 2) if name == "mlp2d" else torch.empty(1, 1 if name == "cnn" else 3, 32, 32)
        calls = []
        _first_layer(model).register_forward_hook(lambda *_: calls.append(1))
        model(x)
    assert len(calls) == 1


def test_in_channels_is_respected() -> None:
    with torch.no_grad():
        assert WideResNet(depth=10, width=1, in_channels=1).eval()(torch.randn(1, 1, 32, 32)).shape == (1, 64)
        assert resnet18(in_channels=1).conv1.in_channels == 1
        assert SmallCNN(in_channels=3).eval()(torch.randn(1, 3, 28, 28)).shape == (1, 128)
        # For the MLP, in_channels aliases in_features so one config key can drive every backbone.
        assert ResidualMLP(in_channels=5).eval()(torch.randn(3, 5)).shape == (3, 128)


def test_wrn_dropout_active_only_in_training() -> None:
    torch.manual_seed(0)
    model = WideResNet(depth=10, width=1, dropout=0.3)  # tiny WRN: same block code, fraction of the cost
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.train()
        a, b = model(x), model(x)
        model.eval()
        c, d = model(x), model(x)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(c, d)


@pytest.mark.parametrize(("name", "dropout"), [("wrn28_2", 0.3), ("wrn28_10", 0.0)])
def test_wrn_config_dropout(name: str, dropout: float) -> None:
    with torch.device("meta"):
        model = build_backbone(name)
    blocks = [block for group in (model.block1, model.block2, model.block3) for block in group]
    assert len(blocks) == 12  # (28 - 4) / 6 = 4 blocks per group
    assert all(block.dropout == dropout for block in blocks)


def test_configs_build_the_expected_classes() -> None:
    with torch.device("meta"):
        assert isinstance(build_backbone("wrn28_10"), WideResNet)
        assert build_backbone("resnet34").block_counts == (3, 4, 6, 3)
        assert build_backbone("resnet18").block_counts == (2, 2, 2, 2)
        assert isinstance(build_backbone("cnn"), SmallCNN)
        assert isinstance(build_backbone("mlp2d"), ResidualMLP)
        assert resnet34().feature_dim == 512
