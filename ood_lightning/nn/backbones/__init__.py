"""Feature extractors (no classifier heads): heads and detectors consume ``forward``/``forward_features``.

Every backbone has ``feature_dim``, ``forward(x) -> [B, feature_dim]`` and
``forward_features(x) -> dict`` of named intermediates in network order ending with "penultimate".
Every backbone subclasses :class:`~ood_lightning.nn.backbones.base.Backbone`. Configs in
``conf/backbone/`` name the classes (``_target_``); ``run.build.build_backbone`` builds them.
"""

from __future__ import annotations

from ood_lightning.nn.backbones.base import Backbone
from ood_lightning.nn.backbones.cifar_resnet import (
    CifarResNet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    cifar_resnet110,
)
from ood_lightning.nn.backbones.crosr_cnn import CROSRCNN
from ood_lightning.nn.backbones.densenet import DenseNetBC, densenet100
from ood_lightning.nn.backbones.residual_mlp import ResidualMLP
from ood_lightning.nn.backbones.resnet import ResNet, resnet18, resnet34
from ood_lightning.nn.backbones.small_cnn import SmallCNN
from ood_lightning.nn.backbones.wide_resnet import WideResNet

__all__ = [
    "Backbone",
    "CROSRCNN",
    "CifarResNet",
    "DenseNetBC",
    "ResNet",
    "ResidualMLP",
    "SmallCNN",
    "WideResNet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "densenet100",
    "resnet18",
    "resnet34",
]
