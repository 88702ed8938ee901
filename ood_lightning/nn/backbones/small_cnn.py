"""Small conv net: the default demo backbone, fast enough to train on MNIST on a laptop CPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.nn.backbones.base import Backbone


class SmallCNN(Backbone):
    """Conv-BN-ReLU-MaxPool blocks, global average pool, then Linear+ReLU to ``feature_dim``.

    Global pooling (not flattening) makes it input-size agnostic, so one model handles 28x28
    (MNIST) and 32x32 (CIFAR/SVHN) alike. forward_features keys: "block1".."blockN" (each
    halves the spatial size), then "penultimate".
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128), feature_dim: int = 128) -> None:
        super().__init__()
        if len(widths) == 0:
            raise ConfigError("backbone.widths: SmallCNN needs at least one block width, e.g. backbone.widths=[32,64,128]")
        self.feature_dim: int = int(feature_dim)
        self._block_names: list[str] = []
        prev = in_channels
        for i, w in enumerate(widths, start=1):
            block = nn.Sequential(
                nn.Conv2d(prev, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )
            self.add_module(f"block{i}", block)
            self._block_names.append(f"block{i}")
            prev = w
        self.fc = nn.Linear(prev, self.feature_dim)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Named intermediate outputs in network order, ending with "penultimate"."""
        feats: dict[str, Tensor] = {}
        out = x
        for name in self._block_names:
            out = getattr(self, name)(out)
            feats[name] = out
        pooled = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        feats["penultimate"] = F.relu(self.fc(pooled))
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """Penultimate features [B, feature_dim]."""
        return self.forward_features(x)["penultimate"]
