"""Feature extractors (no classifier heads): heads and detectors consume ``forward``/``forward_features``.

Every backbone has ``feature_dim``, ``forward(x) -> [B, feature_dim]`` and
``forward_features(x) -> dict`` of named intermediates in network order ending with "penultimate".
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from ood_lightning.nn.backbones.densenet import DenseNetBC, densenet100
from ood_lightning.nn.backbones.residual_mlp import ResidualMLP
from ood_lightning.nn.backbones.resnet import ResNet, resnet18, resnet34
from ood_lightning.nn.backbones.small_cnn import SmallCNN
from ood_lightning.nn.backbones.wide_resnet import WideResNet

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "wrn28_10": partial(WideResNet, depth=28, width=10),
    "wrn28_2": partial(WideResNet, depth=28, width=2, dropout=0.3),
    "resnet18": resnet18,
    "resnet34": resnet34,
    "cnn": SmallCNN,
    "mlp": ResidualMLP,
    "densenet100": densenet100,
}


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone by config name; kwargs override the registry defaults."""
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(sorted(BACKBONES))}") from None
    return factory(**kwargs)


__all__ = [
    "BACKBONES",
    "DenseNetBC",
    "ResNet",
    "ResidualMLP",
    "SmallCNN",
    "WideResNet",
    "build_backbone",
    "densenet100",
    "resnet18",
    "resnet34",
]
