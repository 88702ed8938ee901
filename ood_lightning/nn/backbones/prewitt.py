"""The 2-D feature extractor of the stripes study (Schlumbom & Frank, §4.3): one trainable
2-channel 3x3 convolution, |·|, global max-pool -> a 2-D feature (one value per edge direction).
``init="random"`` (default) is the authors' code (``StripesDetector``: torch's default conv
init), so the trained filters can be compared with the known Prewitt solution;
``init="prewitt"`` starts from the horizontal and vertical Prewitt filters.

Channel 0 is the *horizontal* edge filter (rows -1 / 0 / +1: it answers to intensity changes
from row to row, i.e. to horizontal stripes), channel 1 the *vertical* one (its transpose), so
on the untrained network feature 0 > feature 1 for horizontal stripes and the reverse for
vertical ones. The convolution has no padding and no bias, as in the paper's code
(P-Schlumbom/deep-hybrid-models ``StripesDetector``): without padding a perfectly
axis-aligned stripe image gives exactly 0 in the other channel, and zero-padding borders
would add spurious edges. Unlike the paper's hand-crafted variant the filters are trainable
(``trainable=False`` freezes them); with ``backbone.spectral_coeff`` the convolution's operator
norm is bounded like every other backbone's (the paper's stripes DHM used c = 0.9).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.nn.backbones.base import Backbone

#: horizontal-edge Prewitt kernel (responds to horizontal stripes); the vertical one is its transpose
PREWITT_HORIZONTAL = torch.tensor([[-1.0, -1.0, -1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
PREWITT_VERTICAL = PREWITT_HORIZONTAL.t().contiguous()


def prewitt_kernels(in_channels: int = 1) -> Tensor:
    """``[2, in_channels, 3, 3]``: horizontal then vertical Prewitt filter, the same on every input channel."""
    k = torch.stack([PREWITT_HORIZONTAL, PREWITT_VERTICAL]).unsqueeze(1)
    return k.expand(2, in_channels, 3, 3).clone()


class PrewittNet(Backbone):
    """conv(2 channels, random or Prewitt init) -> |·| -> global max-pool; ``feature_dim = 2``.

    forward_features keys: "conv" (the |conv| maps, [B, 2, H-2, W-2]) and "penultimate" ([B, 2]).
    """

    def __init__(self, in_channels: int = 1, trainable: bool = True, init: str = "random") -> None:
        super().__init__()
        if init not in ("random", "prewitt"):
            raise ConfigError(f"backbone.init must be 'random' or 'prewitt', got {init!r}")
        self.feature_dim: int = 2
        self.conv = nn.Conv2d(in_channels, 2, kernel_size=3, padding=0, bias=False)
        if init == "prewitt":
            with torch.no_grad():
                self.conv.weight.copy_(prewitt_kernels(in_channels))
        self.conv.weight.requires_grad_(trainable)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Named intermediate outputs in network order, ending with "penultimate"."""
        maps = self.conv(x).abs()
        return {"conv": maps, "penultimate": torch.flatten(F.adaptive_max_pool2d(maps, 1), 1)}

    def forward(self, x: Tensor) -> Tensor:
        """The 2-D feature [B, 2]: max |horizontal edge|, max |vertical edge|."""
        return self.forward_features(x)["penultimate"]
