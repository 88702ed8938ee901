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


class _OneLinearBlock(nn.Module):
    """x + ReLU(Linear(x)), DUE's ``FCResNet`` branch: with the Linear bounded by c < 1 the block is
    bi-Lipschitz within [1 − c, 1 + c], so a small c makes the whole stack close to the identity."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.relu(self.fc(x))


class ResidualMLP(Backbone):
    """Input Linear to ``hidden``, ``depth`` residual blocks, final ReLU; feature_dim = hidden.

    forward_features keys: "block1".."block{depth}" (residual stream after each block), then
    "penultimate" (ReLU of the last block, matching the non-negative features of the conv nets).
    """

    def __init__(self, in_features: int = 2, hidden: int = 128, depth: int = 6, in_channels: int | None = None,
                 out_features: int | None = None, branch_layers: int = 2, bound_output: bool = True) -> None:
        """``in_channels`` is an alias for ``in_features`` so one config key builds every backbone.
        ``out_features``: a final Linear(hidden, out_features) whose raw output is the feature (the DHM
        paper's 2-D study, §4.4, has 2-D features); None keeps ReLU(hidden) as the feature.
        ``branch_layers``: Linears per residual branch, 2 (x + W₂ReLU(W₁x)) or 1 (x + ReLU(Wx), DUE's
        ``FCResNet``). ``bound_output=False`` leaves the final Linear out of spectral normalisation
        (:meth:`unbounded_layers`), as DUE's unbounded ``last`` layer."""
        super().__init__()
        if in_channels is not None:
            in_features = in_channels
        if depth < 1:
            raise ConfigError(f"backbone.depth: ResidualMLP depth must be >= 1, got depth={depth}")
        if out_features is not None and out_features < 1:
            raise ConfigError(f"backbone.out_features must be >= 1 or null, got {out_features}")
        self.feature_dim: int = int(hidden if out_features is None else out_features)
        self.stem = nn.Linear(in_features, hidden)
        if branch_layers not in (1, 2):
            raise ConfigError(f"backbone.branch_layers must be 1 or 2, got {branch_layers}")
        block = _ResidualBlock if branch_layers == 2 else _OneLinearBlock
        self.blocks = nn.ModuleList(block(hidden) for _ in range(depth))
        self.proj = None if out_features is None else nn.Linear(hidden, out_features)
        self.bound_output = bool(bound_output)

    def unbounded_layers(self) -> list[nn.Module]:
        return [self.proj] if self.proj is not None and not self.bound_output else []

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
