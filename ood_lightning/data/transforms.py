"""Batched transforms on tensors: augmentation, dequantisation and normalisation.

They run on whole batches on whichever device the batch is on (the GPU when there is
one), which keeps per-sample Python out of the data path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ood_lightning.core.errors import ConfigError

#: crop padding modes: zeros (ours, the common CIFAR recipe) | reflect (the DHM authors' RandomCrop)
PADDING_MODES = ("zeros", "reflect")


def _check_padding_mode(mode: str) -> str:
    if mode not in PADDING_MODES:
        raise ConfigError(f"data.augment.crop_padding_mode must be one of {PADDING_MODES}, got {mode!r}")
    return mode


def _reflect(idx: Tensor, n: int) -> Tensor:
    """Index into [0, n) mirrored at the borders without repeating the edge (numpy/torch 'reflect')."""
    idx = idx.abs()
    return torch.where(idx >= n, 2 * (n - 1) - idx, idx)


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None, mode: str = "zeros") -> Tensor:
    """Pad by ``padding`` (zeros or reflection) and crop back at a random offset per image."""
    _check_padding_mode(mode)
    if padding <= 0:
        return x
    b, _, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    if mode == "reflect":
        if padding >= min(h, w):
            raise ConfigError(f"reflect padding {padding} needs images larger than it, got {h}x{w}")
        # index arithmetic instead of F.pad: works for uint8 too
        return x[batch, chan, _reflect(rows - padding, h), _reflect(cols - padding, w)]
    padded = F.pad(x, (padding,) * 4)
    return padded[batch, chan, rows, cols]


def random_hflip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class Preprocess(torch.nn.Module):
    """uint8 images -> normalised float; augmentation and dequantisation only when training.

    Dequantisation adds U[0, 1) to the 0..255 integers before scaling by 1/256, so that a
    density model sees a continuous input (Theis et al., 2016).
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 crop_padding: int = 0, hflip: bool = False, dequantize: bool = False,
                 crop_padding_mode: str = "zeros"):
        super().__init__()
        _check_padding_mode(crop_padding_mode)
        if (mean is None) != (std is None):
            raise ConfigError("data.mean and data.std must be given together (or both null)")
        self.settings = {"mean": None if mean is None else list(mean), "std": None if std is None else list(std),
                         "crop_padding": int(crop_padding), "hflip": bool(hflip), "dequantize": bool(dequantize),
                         "crop_padding_mode": str(crop_padding_mode)}
        self.normalise = mean is not None
        if self.normalise:
            self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32)[None, :, None, None], persistent=False)
            self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32)[None, :, None, None], persistent=False)
        self.crop_padding = int(crop_padding)
        self.crop_padding_mode = str(crop_padding_mode)
        self.hflip = bool(hflip)
        self.dequantize = bool(dequantize)

    def with_overrides(self, overrides: dict) -> Preprocess:
        """The same preprocessing with some settings replaced (a method's ``inputs``, e.g. a VAE's
        unnormalised [0, 1] pixels); an unknown setting is an error naming the allowed ones."""
        unknown = sorted(set(overrides) - set(self.settings))
        if unknown:
            raise ConfigError(f"method.inputs: unknown settings {unknown}; allowed: {sorted(self.settings)}")
        return Preprocess(**{**self.settings, **overrides})

    def forward(self, x: Tensor, train: bool = False) -> Tensor:
        if x.dtype == torch.uint8:
            if train and self.crop_padding:
                x = random_crop(x, self.crop_padding, mode=self.crop_padding_mode)
            if train and self.hflip:
                x = random_hflip(x)
            x = x.float()
            x = (x + torch.rand_like(x)) / 256.0 if (train and self.dequantize) else x / 255.0
        elif train and x.ndim == 4:
            x = random_crop(x, self.crop_padding, mode=self.crop_padding_mode) if self.crop_padding else x
            x = random_hflip(x) if self.hflip else x
        if self.normalise:
            if x.ndim != 4 or x.shape[1] != self.mean.shape[1]:
                raise ConfigError(f"data.mean has {self.mean.shape[1]} channels but inputs have shape {tuple(x.shape[1:])}")
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x


def match_shape(images: Tensor, shape: Sequence[int], name: str, convert: bool | None) -> Tensor:
    """Bring an OOD set to the ID sample shape (grey<->RGB, bilinear resize) when allowed.

    ``convert`` is None when the OOD set's config has no ``convert`` key (the override then
    needs Hydra's ``+``)."""
    shape = tuple(shape)
    if tuple(images.shape[1:]) == shape:
        return images
    if not convert:
        override = f"{'+' if convert is None else ''}ood.{name}.convert=true"
        raise ConfigError(
            f"OOD set {name!r} has samples of shape {tuple(images.shape[1:])} but the ID set has {shape}; "
            f"pass {override} to convert it (channel repeat/grey + bilinear resize)")
    if images.ndim != 4 or len(shape) != 3:
        raise ConfigError(f"OOD set {name!r}: cannot convert shape {tuple(images.shape[1:])} to {shape}")
    c, h, w = shape
    x = images
    if x.shape[1] == 1 and c == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and c == 1:
        weights = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
        x = (x.float() * weights).sum(1, keepdim=True).round().to(images.dtype)
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(images.dtype) if images.dtype == torch.uint8 else x
    return x.contiguous()
