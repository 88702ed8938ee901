"""A registered dataset plus i.i.d. uniform noise per pixel: VMDLS's "MNIST-noise" OOD set.

VMDLS (and its code) builds MNIST-noise by adding U[0, 1) noise to MNIST test digits *after*
normalising them with mean 0.5 / std 0.5, i.e. U[0, 0.5) in [0, 1] pixel units, without
clipping. Sums above 1 cannot be stored as uint8, so the images are returned as float in
[0, 1 + amplitude] pixel units, which :class:`~ood_lightning.data.transforms.Preprocess`
normalises like any float input (no division by 255).
"""

from __future__ import annotations

from pathlib import Path

import torch


def additive_noise(root: Path, split: str = "test", base: str = "mnist", amplitude: float = 0.5, seed: int = 0,
                   download: bool = False, cache_dir=None, **_):
    """``base``'s ``split`` as float pixels in [0, 1] plus ``amplitude`` * U[0, 1), seeded."""
    from ood_lightning.data.registry import ArrayData, load_dataset  # the registry imports this module

    data = load_dataset(base, split=split, root=root, download=download, cache_dir=cache_dir)
    if data.images.dtype != torch.uint8:
        raise ValueError(f"additive_noise needs a uint8 image set as base, {base!r} has {data.images.dtype}")
    gen = torch.Generator().manual_seed(int(seed))
    x = data.images.float() / 255.0
    x = x + float(amplitude) * torch.rand(x.shape, generator=gen)
    return ArrayData(x, data.labels, data.classes)
