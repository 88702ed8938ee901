"""Wide ResNet for 32x32 inputs (Zagoruyko & Komodakis, 2016), the standard OOD-benchmark backbone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.nn.backbones.base import Backbone
from ood_lightning.nn.backbones.init import kaiming_init


class _WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv-BN-ReLU-(dropout)-conv plus a shortcut.

    When the shape changes, the 1x1 projection shortcut reads the *pre-activated* input,
    as in the authors' reference code, so BN statistics are shared by both paths.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(act)
        out = self.conv1(act)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + identity


class WideResNet(Backbone):
    """WRN-depth-width without the classifier head; ``forward`` gives the pooled 64*width features.

    forward_features keys: "block1".."block3" (raw residual-stream output of each group at
    32/16/8 px for 32x32 input), then "penultimate" (after the final BN-ReLU and global pooling;
    ``final_relu=False``: after the final BN only, as the DHM authors' features, which can be negative).
    """

    def __init__(self, depth: int = 28, width: int = 10, dropout: float = 0.0, in_channels: int = 3,
                 final_relu: bool = True) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(f"backbone.depth: WideResNet depth must be 6n+4 with n >= 1 (e.g. 16, 22, 28, 40), got depth={depth}")
        if width < 1:
            raise ConfigError(f"backbone.width: WideResNet width must be >= 1, got width={width}")
        n = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.depth, self.width, self.final_relu = depth, width, bool(final_relu)
        self.feature_dim: int = widths[-1]

        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.block1 = self._make_group(16, widths[0], n, stride=1, dropout=dropout)
        self.block2 = self._make_group(widths[0], widths[1], n, stride=2, dropout=dropout)
        self.block3 = self._make_group(widths[1], widths[2], n, stride=2, dropout=dropout)
        self.bn = nn.BatchNorm2d(widths[2])
        kaiming_init(self)

    @staticmethod
    def _make_group(in_planes: int, out_planes: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        blocks = [_WideBasicBlock(in_planes, out_planes, stride, dropout)]
        blocks += [_WideBasicBlock(out_planes, out_planes, 1, dropout) for _ in range(n - 1)]
        return nn.Sequential(*blocks)


    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Named intermediate outputs in network order, ending with "penultimate"."""
        feats: dict[str, Tensor] = {}
        out = self.conv1(x)
        for name in ("block1", "block2", "block3"):
            out = getattr(self, name)(out)
            feats[name] = out
        out = self.bn(out)
        if self.final_relu:
            out = F.relu(out)
        feats["penultimate"] = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """Pooled penultimate features [B, feature_dim]."""
        return self.forward_features(x)["penultimate"]
