"""DenseNet-BC for 32x32 inputs (Huang et al., CVPR 2017), the backbone of ODIN, Mahalanobis
and Generalized ODIN: every layer sees the concatenated outputs of all earlier layers in
its block, so features are reused instead of re-learned and 0.8M parameters suffice.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.nn.backbones.base import Backbone
from ood_lightning.nn.backbones.init import kaiming_init


class _BottleneckLayer(nn.Module):
    """BN-ReLU-1x1 conv (to 4k) then BN-ReLU-3x3 conv (to k): the "B" of DenseNet-BC.

    Returns only the k new feature maps; the block concatenates them to its running input.
    The 1x1 bottleneck keeps the 3x3 conv cheap however wide the concatenation grows.
    """

    def __init__(self, in_planes: int, growth_rate: int, dropout: float) -> None:
        super().__init__()
        inter = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.conv2 = nn.Conv2d(inter, growth_rate, 3, padding=1, bias=False)
        self.dropout = dropout

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, p=self.dropout, training=self.training) if self.dropout > 0 else x

    def forward(self, x: Tensor) -> Tensor:
        out = self._drop(self.conv1(F.relu(self.bn1(x))))
        return self._drop(self.conv2(F.relu(self.bn2(out))))


class _DenseBlock(nn.Module):
    """``num_layers`` bottleneck layers, each fed the concatenation of the block input and all
    earlier layers' outputs; output channels = in_planes + num_layers * growth_rate."""

    def __init__(self, in_planes: int, num_layers: int, growth_rate: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _BottleneckLayer(in_planes + i * growth_rate, growth_rate, dropout) for i in range(num_layers)
        )
        self.out_planes = in_planes + num_layers * growth_rate

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class _Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (compression: the "C" of DenseNet-BC) then 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int, dropout: float) -> None:
        layers: list[nn.Module] = [nn.BatchNorm2d(in_planes), nn.ReLU(), nn.Conv2d(in_planes, out_planes, 1, bias=False)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.AvgPool2d(2))
        super().__init__(*layers)


class DenseNetBC(Backbone):
    """DenseNet-BC-depth-k without the classifier head: 3 dense blocks of (depth-4)/6 bottleneck
    layers, joined by compressing transitions; ``forward`` gives the pooled features.

    forward_features keys: "block1".."block3" (each dense block's concatenated output *before*
    the following transition, so 32/16/8 px for 32x32 input, e.g. 216/300/342 channels for
    L=100, k=12), then "penultimate" (after the final BN-ReLU and global average pooling).
    """

    def __init__(self, depth: int = 100, growth_rate: int = 12, reduction: float = 0.5, dropout: float = 0.0,
                 in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(f"backbone.depth: DenseNet-BC depth must be 6n+4 with n >= 1 (e.g. 40, 100, 190), got depth={depth}")
        if growth_rate < 1:
            raise ConfigError(f"backbone.growth_rate: DenseNet-BC growth_rate must be >= 1, got growth_rate={growth_rate}")
        if not 0 < reduction <= 1:
            raise ConfigError(f"backbone.reduction: DenseNet-BC reduction must be in (0, 1], got reduction={reduction}")
        n = (depth - 4) // 6  # each bottleneck layer has two convs; + stem, 2 transitions, classifier
        self.depth, self.growth_rate = depth, growth_rate

        planes = 2 * growth_rate  # the BC variant's stem width
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        for i in (1, 2, 3):
            block = _DenseBlock(planes, n, growth_rate, dropout)
            self.add_module(f"block{i}", block)
            planes = block.out_planes
            if i < 3:
                compressed = int(planes * reduction)
                self.add_module(f"trans{i}", _Transition(planes, compressed, dropout))
                planes = compressed
        self.bn = nn.BatchNorm2d(planes)
        self.feature_dim: int = planes
        kaiming_init(self)


    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Named intermediate outputs in network order, ending with "penultimate"."""
        feats: dict[str, Tensor] = {}
        out = self.conv1(x)
        for i in (1, 2, 3):
            out = getattr(self, f"block{i}")(out)
            feats[f"block{i}"] = out
            if i < 3:
                out = getattr(self, f"trans{i}")(out)
        out = F.relu(self.bn(out))
        feats["penultimate"] = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """Pooled penultimate features [B, feature_dim]."""
        return self.forward_features(x)["penultimate"]


def densenet100(**kwargs: Any) -> DenseNetBC:
    """DenseNet-BC-100 with k=12: 342-d features, 765,732 parameters without the head
    (769,162 with a 10-class Linear head, the published 0.8M)."""
    return DenseNetBC(depth=100, growth_rate=12, **kwargs)
