"""The CIFAR ResNets of He et al. (2016, §4.2): 6n+2 layers, 16/32/64 channels, option-A shortcuts.

A 3x3 conv (16 channels), then three stages of n basic blocks on 32/16/8 px maps, the first
block of stages 2 and 3 with stride 2; global average pooling gives the 64-d features.
Shortcuts carry no parameters ("option A"): where a block halves the map and doubles the
channels, the input is subsampled (every second pixel in both directions) and zero-padded
with (out - in) / 2 channels on each side. Convolutions have no bias (BatchNorm follows).

Module names (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``) are those of the
published CIFAR-10 weights (``../shared/models/cifar10-resnet-he2016``), so
``checkpoints.to_project_layout`` maps them without a per-architecture table.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.nn.backbones.base import Backbone
from ood_lightning.nn.backbones.init import kaiming_init
from ood_lightning.nn.backbones.resnet import _BasicBlock

#: channels of the three stages (the paper's {16, 32, 64} filters on 32/16/8 px maps)
WIDTHS = (16, 32, 64)


class _OptionAShortcut(nn.Module):
    """The parameter-free shortcut where a block changes shape: subsample by ``stride`` and
    zero-pad the new channels, half on each side (He et al. 2016, option A)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x


class _Block(_BasicBlock):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the option-A shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__(in_planes, planes, stride)
        self.shortcut = _OptionAShortcut(in_planes, planes, stride)


class CifarResNet(Backbone):
    """ResNet-(6n+2) for 32x32 inputs, without the classifier head (64-d features).

    forward_features keys: "block1", "block2" (stage outputs at 32/16 px), then "penultimate"
    (stage 3, globally average-pooled). Stage 3 appears once: after its final ReLU, pooling is
    all that separates it from the features, so a separate "block3" would be the same layer
    counted twice by the multi-layer detectors (they pool every layer).
    """

    def __init__(self, depth: int = 20, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"backbone.depth: a CIFAR ResNet has 6n+2 layers (20, 32, 44, 56, 110, ...), got {depth}")
        self.depth = int(depth)
        n = (self.depth - 2) // 6
        self.feature_dim: int = WIDTHS[-1]
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        in_planes = WIDTHS[0]
        for i, planes in enumerate(WIDTHS, start=1):
            stride = 1 if i == 1 else 2
            blocks = [_Block(in_planes, planes, stride)] + [_Block(planes, planes, 1) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        kaiming_init(self)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Named intermediate outputs in network order, ending with "penultimate"."""
        out = F.relu(self.bn1(self.conv1(x)))
        block1 = self.layer1(out)
        block2 = self.layer2(block1)
        pooled = torch.flatten(F.adaptive_avg_pool2d(self.layer3(block2), 1), 1)
        return {"block1": block1, "block2": block2, "penultimate": pooled}

    def forward(self, x: Tensor) -> Tensor:
        """Pooled penultimate features [B, 64]."""
        return self.forward_features(x)["penultimate"]


def cifar_resnet20(**kwargs: Any) -> CifarResNet:
    """ResNet-20 (n=3): 0.27M parameters with a 10-class head."""
    return CifarResNet(depth=20, **kwargs)


def cifar_resnet32(**kwargs: Any) -> CifarResNet:
    """ResNet-32 (n=5): 0.46M parameters with a 10-class head."""
    return CifarResNet(depth=32, **kwargs)


def cifar_resnet44(**kwargs: Any) -> CifarResNet:
    """ResNet-44 (n=7): 0.66M parameters with a 10-class head."""
    return CifarResNet(depth=44, **kwargs)


def cifar_resnet56(**kwargs: Any) -> CifarResNet:
    """ResNet-56 (n=9): 0.85M parameters with a 10-class head."""
    return CifarResNet(depth=56, **kwargs)


def cifar_resnet110(**kwargs: Any) -> CifarResNet:
    """ResNet-110 (n=18): 1.7M parameters with a 10-class head."""
    return CifarResNet(depth=110, **kwargs)
