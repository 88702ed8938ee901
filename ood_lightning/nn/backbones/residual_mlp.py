"""Residual MLP for low-dimensional toy data (2-D moons, blobs), where conv nets make no sense."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.errors import ConfigError
from ood_lightning.nn.backbones.base import Backbone


class _ResidualBlock(nn.Module):
    """x + Linear(ReLU(Linear(x))): the skip keeps a deep MLP trainable without normalisation."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class ResidualMLP(Backbone):
    """Input Linear to ``hidden``, ``depth`` residual blocks, final ReLU; feature_dim = hidden.

    forward_features keys: "block1".."block{depth}" (residual stream after each block), then
    "penultimate" (ReLU of the last block, matching the non-negative features of the conv nets).
    """

    def __init__(self, in_features: int = 2, hidden: int = 128, depth: int = 6, in_channels: int | None = None) -> None:
        """``in_channels`` is an alias for ``in_features`` so one config key builds every backbone."""
        super().__init__()
        if in_channels is not None:
            in_features = in_channels
        if depth < 1:
            raise ConfigError(f"backbone.depth: ResidualMLP depth must be >= 1, got depth={depth}")
        self.feature_dim: int = int(hidden)
        self.stem = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden) for _ in range(depth))

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Named intermediate outputs in network order, ending with "penultimate"."""
        feats: dict[str, Tensor] = {}
        out = self.stem(x)
        for i, block in enumerate(self.blocks, start=1):
            out = block(out)
            feats[f"block{i}"] = out
        feats["penultimate"] = F.relu(out)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """Penultimate features [B, hidden]."""
        return self.forward_features(x)["penultimate"]
