"""Synthetic ID and OOD sets that need no download: noise images, 2-D toys, 9x9 stripes.

They exist so that detectors can be sanity-checked in seconds and so that "far OOD"
baselines (noise, blobs) are always available next to the real benchmark sets.

Every generator draws only from a local ``torch.Generator`` (or, for ``two_moons``,
sklearn's ``random_state``) seeded by ``seed``: the same seed gives the same tensors
and the global RNG state is never touched. Each returns ``(x, y)``:

* image sets: ``x`` uint8 ``[N, C, H, W]`` in 0..255, ``y`` int64 ``[N]`` filled with -1;
* 2-D toys: ``x`` float32 ``[N, 2]``, ``y`` int64 class labels;
* stripes: ``x`` float32 ``[N, 1, S, S]`` in [0, 1], ``y`` int64 (-1 for the OOD set).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError

Shape = tuple[int, int, int]


def _check_n(n: int) -> None:
    if n < 0:
        raise ConfigError(f"synthetic set size n must be >= 0, got {n}")


def _check_shape(shape: Sequence[int]) -> Shape:
    if len(shape) != 3 or any(int(s) <= 0 for s in shape):
        raise ConfigError(f"image shape must be (C, H, W) with positive sizes, got {tuple(shape)}")
    c, h, w = (int(s) for s in shape)
    return c, h, w


def _generator(seed: int) -> torch.Generator:
    """A private generator, so that building a data set never perturbs training randomness."""
    return torch.Generator().manual_seed(int(seed))


def _to_uint8(x01: Tensor) -> Tensor:
    """Map [0, 1] floats to 0..255 the way image sets are stored (clip, scale, round)."""
    return torch.round(x01.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def _no_labels(n: int) -> Tensor:
    return torch.full((n,), -1, dtype=torch.int64)


def _balanced_labels(n: int, num_classes: int, gen: torch.Generator) -> Tensor:
    """Class counts differ by at most one, in random order (so any prefix is mixed)."""
    labels = torch.arange(n, dtype=torch.int64) % num_classes
    return labels[torch.randperm(n, generator=gen)]


# --------------------------------------------------------------------------- noise images


def gaussian_noise(
    n: int,
    shape: Sequence[int] = (3, 32, 32),
    seed: int = 0,
    mean: float = 0.5,
    std: float = 0.25,
) -> tuple[Tensor, Tensor]:
    """I.i.d. N(mean, std) per pixel in [0, 1] units, clipped to [0, 1], stored as uint8.

    This is the "Gaussian" far-OOD set of the Mahalanobis / likelihood-ratio literature;
    clipping at 0 and 1 piles a little mass on the extremes and shrinks the std a bit.
    """
    _check_n(n)
    c, h, w = _check_shape(shape)
    gen = _generator(seed)
    x = mean + std * torch.randn((n, c, h, w), generator=gen)
    return _to_uint8(x), _no_labels(n)


def uniform_noise(n: int, shape: Sequence[int] = (3, 32, 32), seed: int = 0) -> tuple[Tensor, Tensor]:
    """I.i.d. U[0, 1] per pixel, stored as uint8 (rounding gives 0 and 255 half-width bins)."""
    _check_n(n)
    c, h, w = _check_shape(shape)
    gen = _generator(seed)
    x = torch.rand((n, c, h, w), generator=gen)
    return _to_uint8(x), _no_labels(n)


def rademacher_noise(n: int, shape: Sequence[int] = (3, 32, 32), seed: int = 0) -> tuple[Tensor, Tensor]:
    """Each pixel independently 0 or 255 with probability 1/2 (i.e. +-1 in [-1, 1] units)."""
    _check_n(n)
    c, h, w = _check_shape(shape)
    gen = _generator(seed)
    bits = torch.randint(0, 2, (n, c, h, w), generator=gen, dtype=torch.uint8)
    return bits * 255, _no_labels(n)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of [N, 1, H, W] with reflect padding, kernel cut at 3 sigma."""
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    h, w = x.shape[-2:]
    # Reflect padding needs pad < size; fall back to replicate for tiny images.
    mode = "reflect" if radius < min(h, w) else "replicate"
    x = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode=mode)
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1))


def blobs(n: int, shape: Sequence[int] = (3, 32, 32), seed: int = 0) -> tuple[Tensor, Tensor]:
    """Amorphous binary shapes with sharp edges (the "Blobs" OOD set of Outlier Exposure).

    Recipe: Bernoulli(p=0.7) per pixel, Gaussian blur with sigma 1.0, threshold at 0.75,
    so pixels become 0 or 255. One mask is drawn per image and copied to every channel,
    which makes the blobs grey-level shapes rather than colour noise.
    """
    _check_n(n)
    c, h, w = _check_shape(shape)
    gen = _generator(seed)
    bern = torch.bernoulli(torch.full((n, 1, h, w), 0.7), generator=gen)
    mask = _gaussian_blur(bern, sigma=1.0) > 0.75
    x = mask.to(torch.uint8).expand(n, c, h, w).contiguous() * 255
    return x, _no_labels(n)


# --------------------------------------------------------------------------- 2-D toys


def two_moons(n: int, noise: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """sklearn's interleaving half-moons: not linearly separable, trivially separable by k-NN."""
    from sklearn.datasets import make_moons

    _check_n(n)
    if n == 0:  # sklearn refuses n_samples=0; an empty set is still a valid request
        return torch.zeros((0, 2), dtype=torch.float32), torch.zeros((0,), dtype=torch.int64)
    x, y = make_moons(n_samples=n, noise=noise, random_state=seed)
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)


def rings(
    n: int,
    num_rings: int = 2,
    radii: Sequence[float] | None = None,
    noise: float = 0.05,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Concentric rings, one class per ring: a toy where the classes are nested, not side by side.

    Angles are uniform on [0, 2 pi), radius = radii[class] + N(0, noise); classes are balanced
    (counts differ by at most one). Default radii are 1, 2, ..., num_rings.
    """
    _check_n(n)
    if num_rings < 1:
        raise ConfigError(f"rings needs num_rings >= 1, got {num_rings}")
    if radii is None:
        radii = [float(i + 1) for i in range(num_rings)]
    if len(radii) != num_rings:
        raise ConfigError(f"rings got {len(radii)} radii for num_rings={num_rings}; pass one per ring")
    gen = _generator(seed)
    y = _balanced_labels(n, num_rings, gen)
    theta = 2.0 * math.pi * torch.rand(n, generator=gen)
    r = torch.as_tensor(list(radii), dtype=torch.float32)[y] + noise * torch.randn(n, generator=gen)
    x = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)
    return x.to(torch.float32), y


# --------------------------------------------------------------------------- stripes


def _stripe_gap(width: Tensor) -> Tensor:
    """Background gap between stripes of the given width(s): as wide as the stripe, at least 2."""
    return width.clamp(min=2)


def _periodic_stripes(cos_t: Tensor, sin_t: Tensor, width: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Rasterise stripes of direction (cos_t, sin_t) into [N, 1, size, size] float images.

    Geometry (shared by the ID and OOD sets so they differ only in angle): with the origin
    at the image centre, x to the right and y *up*, each pixel centre gets its signed
    distance ``d = -sin_t * x + cos_t * y`` to the line through the centre along the stripe
    direction. With gap ``g = max(w, 2)``, period ``p = w + g`` and a random phase in
    [0, p), the pixel is on a stripe when ``(d + phase) mod p < w``. Each stripe gets its
    own value ~ U(0, 1]; gaps are 0. For axis-aligned directions ``d`` is an integer, so
    every fully visible stripe is exactly ``w`` pixels and every full gap ``g`` pixels.
    The gap is at least 2 because 1-px diagonal stripes with 1-px gaps alias into a moire
    pattern on a 9x9 grid instead of reading as stripes.
    """
    n = width.shape[0]
    c = (size - 1) / 2.0
    idx = torch.arange(size, dtype=torch.float32)
    xs = (idx - c).view(1, 1, size)  # column -> x
    ys = (c - idx).view(1, size, 1)  # row -> y (up)
    d = -sin_t.view(n, 1, 1) * xs + cos_t.view(n, 1, 1) * ys  # [N, size, size]
    w = width.to(torch.float32).view(n, 1, 1)
    period = w + _stripe_gap(width).to(torch.float32).view(n, 1, 1)
    u = d + torch.rand((n, 1, 1), generator=gen) * period
    on = torch.remainder(u, period) < w
    k = torch.floor(u / period).to(torch.int64)
    k = k - k.amin(dim=(1, 2), keepdim=True)
    # d spans at most (size - 1) * sqrt(2) < 1.5 * size and the period is >= 3, so an image
    # crosses fewer than size / 2 + 2 periods: size + 2 values always suffice.
    values = 1.0 - torch.rand((n, size + 2), generator=gen)  # U(0, 1]: a stripe is never 0
    v = torch.gather(values, 1, k.reshape(n, size * size)).view(n, size, size)
    return torch.where(on, v, torch.zeros_like(v)).unsqueeze(1)


def stripes(n: int, seed: int = 0, size: int = 9) -> tuple[Tensor, Tensor]:
    """The 9x9 "stripes" ID set: class 0 horizontal stripes, class 1 vertical stripes.

    Each image has one stripe width w ~ U{1, 2, 3, 4}; stripes of width w alternate with
    background gaps of width max(w, 2) at a random phase (see :func:`_periodic_stripes`),
    so stripes and gaps cut by the border may be narrower; one value ~ U(0, 1] per stripe,
    background 0. Classes are balanced. (The DHM-revisited code tiles the image with
    touching stripes; we keep 0-valued gaps so that stripe widths are readable.) The OOD
    counterpart is :func:`diagonal_stripes`, drawn by the same rasteriser.
    """
    _check_n(n)
    if size < 2:
        raise ConfigError(f"stripes needs size >= 2, got {size}")
    gen = _generator(seed)
    y = _balanced_labels(n, 2, gen)
    width = torch.randint(1, 5, (n,), generator=gen)
    # Exact 0/1 direction components keep axis-aligned stripes exactly pixel-aligned.
    cos_t = (y == 0).to(torch.float32)
    sin_t = (y == 1).to(torch.float32)
    return _periodic_stripes(cos_t, sin_t, width, size, gen), y


def diagonal_stripes(n: int, seed: int = 0, size: int = 9, max_deviation: float = 30.0) -> tuple[Tensor, Tensor]:
    """OOD set for :func:`stripes`: the same stripes, but at 45 +- ``max_deviation`` degrees.

    The DHM paper (§4.3) says both "between 15° and 75°" and "45° ± 15°"; the default 30 (15-75°)
    is the authors' code (``StripedOODImages(max_deviation=30)``); 15 gives 30-60°.
    The angle from horizontal is U[45 - max_deviation, 45 + max_deviation] degrees, mirrored to 180 - angle ("\\" instead
    of "/") with probability 1/2; width w ~ U{1, 2, 3, 4} measured perpendicular to the
    stripes; pixels are on by the distance of their centres to a line through the image
    centre (see :func:`_periodic_stripes`). Labels are -1.
    """
    _check_n(n)
    if size < 2:
        raise ConfigError(f"diagonal_stripes needs size >= 2, got {size}")
    if not 0.0 <= max_deviation < 45.0:
        raise ConfigError(f"diagonal_stripes needs 0 <= max_deviation < 45 degrees (off the axes), got {max_deviation}")
    gen = _generator(seed)
    dev = float(max_deviation)
    angle = torch.deg2rad(45.0 - dev + 2.0 * dev * torch.rand(n, generator=gen))
    mirror = torch.rand(n, generator=gen) < 0.5
    cos_t = torch.where(mirror, -torch.cos(angle), torch.cos(angle))
    sin_t = torch.sin(angle)
    width = torch.randint(1, 5, (n,), generator=gen)
    return _periodic_stripes(cos_t, sin_t, width, size, gen), _no_labels(n)


SYNTHETIC: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "gaussian_noise": gaussian_noise,
    "uniform_noise": uniform_noise,
    "rademacher_noise": rademacher_noise,
    "blobs": blobs,
    "moons": two_moons,
    "rings": rings,
    "stripes": stripes,
    "diagonal_stripes": diagonal_stripes,
}
