"""The plain CNN of CROSR (Yoshihashi et al. 2019), the backbone VMDLS uses on MNIST (its Table 3).

VMDLS §4 says only "the same CNN specified in [Yoshihashi et al., 2019]"; the layers here are
the ones of the VMDLS authors' MNIST encoder (``MnistConvEncoder``, ``enc_type=mnist-conv``):
five 3×3 convolutions of 100 channels (padding 1, ReLU, no batch norm), 2×2 max pooling after
the 2nd, 4th and 5th, the 100×3×3 map flattened into a 500-unit linear layer (no activation)
that feeds the VMDLS head (their ``enc_out_dim`` 500).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.nn.backbones.base import Backbone


class CROSRCNN(Backbone):
    """conv-conv-pool | conv-conv-pool | conv-pool, flatten, linear.

    forward_features keys: "block1".."block3" (the three pooled stages: 100 channels at
    ⌊s/2⌋, ⌊s/4⌋, ⌊s/8⌋ px; 14/7/3 for MNIST), then "penultimate" (the linear layer's output,
    which can be negative: no ReLU, as in the authors' code). It flattens, so the input size
    is fixed at construction (``image_size``).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, width: int = 100, feature_dim: int = 500) -> None:
        super().__init__()
        side = int(image_size) // 8
        if side < 1:
            raise ConfigError(f"backbone.image_size: the CROSR CNN pools three times by 2, so it needs >= 8 px, got {image_size}")
        self.image_size = int(image_size)
        self.feature_dim: int = int(feature_dim)
        w = int(width)

        def conv(cin: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=True)]

        self.block1 = nn.Sequential(*conv(in_channels), *conv(w), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*conv(w), *conv(w), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(*conv(w), nn.MaxPool2d(2))
        self.fc = nn.Linear(w * side * side, self.feature_dim)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Named stage outputs in network order, ending with "penultimate"."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ConfigError(f"the CROSR CNN was built for {self.image_size}x{self.image_size} inputs "
                              f"(backbone.image_size), got {tuple(x.shape[-2:])}")
        b1 = self.block1(x)
        b2 = self.block2(b1)
        b3 = self.block3(b2)
        return {"block1": b1, "block2": b2, "block3": b3, "penultimate": self.fc(torch.flatten(b3, 1))}
