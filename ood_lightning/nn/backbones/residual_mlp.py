"""Residual MLP for low-dimensional toy data (2-D moons, blobs), where conv nets make no sense."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError
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

    def __init__(self, in_features: int = 2, hidden: int = 128, depth: int = 6, in_channels: int | None = None,
                 out_features: int | None = None) -> None:
        """``in_channels`` is an alias for ``in_features`` so one config key builds every backbone.
        ``out_features``: a final Linear(hidden, out_features) whose raw output is the feature (the DHM
        paper's 2-D study, §4.4, has 2-D features); None keeps ReLU(hidden) as the feature."""
        super().__init__()
        if in_channels is not None:
            in_features = in_channels
        if depth < 1:
            raise ConfigError(f"backbone.depth: ResidualMLP depth must be >= 1, got depth={depth}")
        if out_features is not None and out_features < 1:
            raise ConfigError(f"backbone.out_features must be >= 1 or null, got {out_features}")
        self.feature_dim: int = int(hidden if out_features is None else out_features)
        self.stem = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden) for _ in range(depth))
        self.proj = None if out_features is None else nn.Linear(hidden, out_features)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Named intermediate outputs in network order, ending with "penultimate"."""
        feats: dict[str, Tensor] = {}
        out = self.stem(x)
        for i, block in enumerate(self.blocks, start=1):
            out = block(out)
            feats[f"block{i}"] = out
        feats["penultimate"] = F.relu(out) if self.proj is None else self.proj(out)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """Penultimate features [B, feature_dim]."""
        return self.forward_features(x)["penultimate"]
