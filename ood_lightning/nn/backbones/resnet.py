"""CIFAR-style ResNet (He et al., 2016): 3x3 stem, no max-pool, so 32x32 inputs keep spatial detail."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.nn.backbones.base import Backbone
from ood_lightning.nn.backbones.init import kaiming_init


class _BasicBlock(nn.Module):
    """Post-activation basic block conv-BN-ReLU-conv-BN (+ shortcut) then ReLU."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            # Projection shortcut (option B) so the residual sum has matching shape.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(Backbone):
    """ResNet with four stages of BasicBlocks (64/128/256/512 channels) and no classifier head.

    forward_features keys: "block1".."block3" (stage outputs at 32/16/8 px for 32x32 input),
    then "penultimate" (globally average-pooled block4, 512-d): the last stage once, as in
    LSGM's four states for ResNet-34.
    """

    def __init__(self, block_counts: Sequence[int] = (2, 2, 2, 2), in_channels: int = 3) -> None:
        super().__init__()
        if len(block_counts) != 4 or any(int(c) < 1 for c in block_counts):
            raise ConfigError(f"backbone.block_counts: ResNet needs four positive block counts, got {tuple(block_counts)}")
        self.block_counts = tuple(int(c) for c in block_counts)
        widths, strides = (64, 128, 256, 512), (1, 2, 2, 2)
        self.feature_dim: int = widths[-1]

        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, (count, planes, stride) in enumerate(zip(self.block_counts, widths, strides), start=1):
            blocks = [_BasicBlock(in_planes, planes, stride)]
            blocks += [_BasicBlock(planes, planes, 1) for _ in range(count - 1)]
            self.add_module(f"block{i}", nn.Sequential(*blocks))
            in_planes = planes
        kaiming_init(self)


    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Named intermediate outputs in network order, ending with "penultimate"."""
        feats: dict[str, Tensor] = {}
        out = F.relu(self.bn1(self.conv1(x)))
        for name in ("block1", "block2", "block3", "block4"):
            out = getattr(self, name)(out)
            if name != "block4":  # block4 is the penultimate features, pooled
                feats[name] = out
        feats["penultimate"] = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """Pooled penultimate features [B, 512]."""
        return self.forward_features(x)["penultimate"]


def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18 (CIFAR variant), about 11.17M parameters without the head."""
    return ResNet(block_counts=(2, 2, 2, 2), **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34 (CIFAR variant), about 21.28M parameters without the head."""
    return ResNet(block_counts=(3, 4, 6, 3), **kwargs)
