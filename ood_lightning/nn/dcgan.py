"""DCGAN-style convolutional encoder and decoder (Radford et al., 2016) for VAEs.

Encoder: stride-2 4x4 convolutions, LeakyReLU(0.2), BatchNorm after every convolution but
the first (as in the DCGAN discriminator), flattened to ``feature_dim``. Decoder, its
mirror image: Linear from the latent to a ``base x base`` map, BatchNorm + ReLU, stride-2
4x4 transposed convolutions with BatchNorm + ReLU, and a last transposed convolution to
the likelihood's parameters (no BatchNorm, no activation).

Any square image size works: with L layers the input is zero-padded (centred) to the next
multiple of 2^L and the decoder's output is cropped back, so the likelihood covers only the
real pixels (28x28 MNIST runs through a 32x32 network, 9x9 stripes through 12x12).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.nn.backbones.base import Backbone


def _padding(image_size: int, layers: int) -> tuple[int, int, int]:
    """(base size, pad before, pad after) for ``layers`` halvings of ``image_size``."""
    factor = 2 ** layers
    base = max(1, math.ceil(image_size / factor))
    pad = base * factor - image_size
    return base, pad // 2, pad - pad // 2


class DCGANEncoder(Backbone):
    """Images [B, C, H, W] -> features [B, widths[-1] * base^2] (the VAE's posterior head follows).

    A backbone in the framework's sense: ``feature_dim``, ``forward`` and ``forward_features``
    (``block1``..``blockL`` then ``penultimate`` = the flattened last block).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, widths: Sequence[int] = (64, 128, 256),
                 negative_slope: float = 0.2):
        super().__init__()
        if len(widths) == 0:
            raise ConfigError("backbone.widths: DCGANEncoder needs at least one width, e.g. backbone.widths=[64,128,256]")
        self.in_channels, self.image_size, self.widths = int(in_channels), int(image_size), tuple(int(w) for w in widths)
        self.base, self.pad_before, self.pad_after = _padding(self.image_size, len(self.widths))
        self.feature_dim = self.widths[-1] * self.base ** 2
        blocks, prev = [], self.in_channels
        for i, w in enumerate(self.widths):
            layers: list[nn.Module] = [nn.Conv2d(prev, w, 4, 2, 1, bias=i == 0)]
            if i > 0:
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.LeakyReLU(negative_slope, inplace=True))
            blocks.append(nn.Sequential(*layers))
            prev = w
        self.blocks = nn.ModuleList(blocks)

    def pad(self, x: Tensor) -> Tensor:
        if self.pad_before == self.pad_after == 0:
            return x
        return F.pad(x, (self.pad_before, self.pad_after, self.pad_before, self.pad_after))

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        feats, out = {}, self.pad(x)
        for i, block in enumerate(self.blocks, start=1):
            out = block(out)
            feats[f"block{i}"] = out
        feats["penultimate"] = out.flatten(1)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        out = self.pad(x)
        for block in self.blocks:
            out = block(out)
        return out.flatten(1)


class DCGANDecoder(nn.Module):
    """Latents [B, latent_dim] -> likelihood parameters [B, out_channels, image_size, image_size]."""

    def __init__(self, latent_dim: int, out_channels: int, image_size: int = 32,
                 widths: Sequence[int] = (256, 128, 64)):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.image_size = int(image_size)
        self.base, self.crop, _ = _padding(self.image_size, len(self.widths))
        self.project = nn.Linear(latent_dim, self.widths[0] * self.base ** 2, bias=False)
        self.project_bn = nn.Sequential(nn.BatchNorm2d(self.widths[0]), nn.ReLU(inplace=True))
        blocks = []
        for w_in, w_out in zip(self.widths[:-1], self.widths[1:]):
            blocks += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(inplace=True)]
        blocks.append(nn.ConvTranspose2d(self.widths[-1], out_channels, 4, 2, 1))
        self.blocks = nn.Sequential(*blocks)

    @classmethod
    def mirror(cls, encoder: DCGANEncoder, latent_dim: int, out_channels: int) -> DCGANDecoder:
        """The decoder whose layers mirror ``encoder``'s (same widths reversed, same image size)."""
        return cls(latent_dim, out_channels, encoder.image_size, tuple(reversed(encoder.widths)))

    def forward(self, z: Tensor) -> Tensor:
        h = self.project(z).view(z.shape[0], self.widths[0], self.base, self.base)
        out = self.blocks(self.project_bn(h))
        c, s = self.crop, self.image_size
        return out[..., c:c + s, c:c + s] if out.shape[-1] != s else out


__all__ = ["DCGANDecoder", "DCGANEncoder"]
