"""Synthetic sets: each check compares the output with the geometry the docstrings promise."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.data.synthetic import (
    SYNTHETIC,
    blobs,
    diagonal_stripes,
    gaussian_noise,
    rademacher_noise,
    rings,
    stripes,
    two_moons,
    uniform_noise,
)

SMALL_SHAPE = (3, 8, 8)
IMAGE_SETS = ("gaussian_noise", "uniform_noise", "rademacher_noise", "blobs")

# Small keyword sets per registry entry, so every generator runs in a few milliseconds.
KWARGS: dict[str, dict[str, Any]] = {
    **{name: {"shape": SMALL_SHAPE} for name in IMAGE_SETS},
    "moons": {},
    "rings": {"num_rings": 3},
    "stripes": {},
    "diagonal_stripes": {},
}

EXPECTED_X: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    **{name: (torch.uint8, SMALL_SHAPE) for name in IMAGE_SETS},
    "moons": (torch.float32, (2,)),
    "rings": (torch.float32, (2,)),
    "stripes": (torch.float32, (1, 9, 9)),
    "diagonal_stripes": (torch.float32, (1, 9, 9)),
}


def _runs(mask: list[bool]) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal values as (start, length, value)."""
    runs: list[tuple[int, int, bool]] = []
    start = 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((start, i - start, mask[start]))
            start = i
    return runs


def _stripe_orientation_deg(images: Tensor) -> Tensor:
    """Dominant stripe direction per image in degrees [0, 180), x right and y up.

    Structure tensor of central-difference gradients: its main eigenvector is the gradient
    direction, and the stripes run perpendicular to it.
    """
    img = images[:, 0].double()
    gx = torch.zeros_like(img)
    gy = torch.zeros_like(img)
    gx[:, :, 1:-1] = (img[:, :, 2:] - img[:, :, :-2]) / 2
    gy[:, 1:-1, :] = -(img[:, 2:, :] - img[:, :-2, :]) / 2  # rows grow downwards
    jxx = (gx * gx).sum((1, 2))
    jyy = (gy * gy).sum((1, 2))
    jxy = (gx * gy).sum((1, 2))
    gradient_angle = 0.5 * torch.atan2(2 * jxy, jxx - jyy)
    return torch.rad2deg(gradient_angle + math.pi / 2) % 180


# --------------------------------------------------------------------------- all generators


def test_registry_names_the_public_generators() -> None:
    assert set(SYNTHETIC) == set(KWARGS)
    assert SYNTHETIC["moons"] is two_moons and SYNTHETIC["stripes"] is stripes


@pytest.mark.parametrize("name", sorted(KWARGS))
def test_dtype_shape_and_labels(name: str) -> None:
    x, y = SYNTHETIC[name](50, seed=1, **KWARGS[name])
    dtype, tail = EXPECTED_X[name]
    assert x.dtype == dtype and tuple(x.shape) == (50, *tail)
    assert y.dtype == torch.int64 and tuple(y.shape) == (50,)
    if name in IMAGE_SETS or name == "diagonal_stripes":
        assert torch.all(y == -1)
    else:
        assert y.min() >= 0
    if name in ("stripes", "diagonal_stripes"):
        assert x.min() >= 0.0 and x.max() <= 1.0


@pytest.mark.parametrize("name", sorted(KWARGS))
def test_same_seed_same_data_other_seed_other_data(name: str) -> None:
    fn, kw = SYNTHETIC[name], KWARGS[name]
    x1, y1 = fn(40, seed=3, **kw)
    torch.manual_seed(12345)  # the global state must not matter
    np.random.seed(12345)
    x2, y2 = fn(40, seed=3, **kw)
    x3, _ = fn(40, seed=4, **kw)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_global_rng_state_is_left_alone() -> None:
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    for name, fn in SYNTHETIC.items():
        fn(10, seed=0, **KWARGS[name])
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)


@pytest.mark.parametrize("name", sorted(KWARGS))
def test_empty_request_gives_empty_tensors(name: str) -> None:
    x, y = SYNTHETIC[name](0, **KWARGS[name])
    assert x.shape[0] == 0 and y.shape == (0,)


def test_bad_arguments_raise_config_error() -> None:
    with pytest.raises(ConfigError, match=r"synthetic set size n must be >= 0, got -1"):
        gaussian_noise(-1)
    with pytest.raises(ConfigError, match=r"image shape must be \(C, H, W\) with positive sizes, got \(32, 32\)"):
        uniform_noise(2, shape=(32, 32))
    with pytest.raises(ConfigError, match=r"rings got 3 radii for num_rings=2; pass one per ring"):
        rings(10, num_rings=2, radii=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match=r"rings needs num_rings >= 1, got 0"):
        rings(10, num_rings=0)


# --------------------------------------------------------------------------- noise images


def _clipped_normal_std(mean: float, std: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """Std of N(mean, std) clipped to [lo, hi], from the closed form (for symmetric clipping)."""

    def phi(z: float) -> float:
        return math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)

    def cdf(z: float) -> float:
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    a, b = (lo - mean) / std, (hi - mean) / std
    inside = std**2 * ((cdf(b) - cdf(a)) - (b * phi(b) - a * phi(a)))
    tails = (lo - mean) ** 2 * cdf(a) + (hi - mean) ** 2 * (1 - cdf(b))
    return math.sqrt(inside + tails)


def test_gaussian_noise_moments_match_clipped_normal() -> None:
    x, _ = gaussian_noise(200, seed=0)
    v = x.double()
    assert abs(v.mean().item() - 127.5) < 0.5
    expected_std = 255 * _clipped_normal_std(0.5, 0.25)  # ~61.2, below the unclipped 63.75
    assert abs(v.std().item() - expected_std) < 0.01 * expected_std
    # Clipping puts P(z < -2) ~ 2.3% of the mass exactly on each end.
    assert 0.018 < (x == 0).double().mean().item() < 0.028
    assert 0.018 < (x == 255).double().mean().item() < 0.028


def test_gaussian_noise_honours_mean_and_std() -> None:
    x, _ = gaussian_noise(100, seed=0, mean=0.2, std=0.05)  # 4 sigma from 0: no clipping
    v = x.double()
    assert abs(v.mean().item() - 0.2 * 255) < 0.2
    assert abs(v.std().item() - 0.05 * 255) < 0.2


def test_uniform_noise_is_flat() -> None:
    x, _ = uniform_noise(200, shape=(3, 32, 32), seed=0)
    v = x.double()
    assert abs(v.mean().item() - 127.5) < 0.5
    counts = torch.bincount(x.flatten().long(), minlength=256).double()
    bins = counts.view(16, 16).sum(1) / counts.sum()
    # Rounding 255 * U[0, 1] gives 0 and 255 half-width bins.
    expected = torch.full((16,), 16 / 255, dtype=torch.float64)
    expected[0] = expected[-1] = 15.5 / 255
    assert torch.allclose(bins, expected, rtol=0.03)
    assert counts[0] > 0 and counts[255] > 0


def test_rademacher_noise_is_two_valued_and_fair() -> None:
    x, _ = rademacher_noise(200, shape=(3, 32, 32), seed=0)
    assert set(x.unique().tolist()) == {0, 255}
    assert abs((x == 255).double().mean().item() - 0.5) < 0.005


def _neighbour_agreement(mask: Tensor) -> float:
    """Fraction of horizontally or vertically adjacent pixel pairs with the same value."""
    same_h = (mask[..., :, 1:] == mask[..., :, :-1]).double().mean()
    same_v = (mask[..., 1:, :] == mask[..., :-1, :]).double().mean()
    return float((same_h + same_v) / 2)


def test_blobs_are_binary_smooth_shapes() -> None:
    x, _ = blobs(200, shape=(3, 32, 32), seed=0)
    assert set(x.unique().tolist()) == {0, 255}
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # one mask per image
    on = x[:, 0] == 255
    frac = on.double().mean().item()
    # Blurred Bernoulli(0.7) has mean 0.7 and std ~0.13, so roughly a third exceeds 0.75.
    assert 0.2 < frac < 0.5
    per_image = on.double().mean((1, 2))
    assert per_image.min() > 0.05 and per_image.max() < 0.8  # every image has shapes, none is solid
    noise, _ = rademacher_noise(200, shape=(3, 32, 32), seed=0)
    rad_agree = _neighbour_agreement(noise[:, 0] == 255)
    blob_agree = _neighbour_agreement(on)
    assert rad_agree < 0.52 and blob_agree > 0.75


# --------------------------------------------------------------------------- 2-D toys


def test_moons_balanced_nonlinear_but_knn_separable() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    x, y = two_moons(1000, noise=0.1, seed=0)
    assert torch.bincount(y).tolist() == [500, 500]
    xn, yn = x.numpy(), y.numpy()
    linear = cross_val_score(LogisticRegression(), xn, yn, cv=5).mean()
    knn = cross_val_score(KNeighborsClassifier(n_neighbors=5), xn, yn, cv=5).mean()
    assert linear < 0.92
    assert knn > 0.95


def test_moons_without_noise_lie_on_unit_half_circles() -> None:
    x, y = two_moons(200, noise=0.0, seed=0)
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.5]])  # sklearn's moons: outer, inner
    r = (x - centres[y]).norm(dim=1)
    assert torch.allclose(r, torch.ones_like(r), atol=1e-5)
    assert torch.all(x[y == 0, 1] >= -1e-6) and torch.all(x[y == 1, 1] <= 0.5 + 1e-6)


def test_rings_radius_matches_class() -> None:
    noise = 0.05
    x, y = rings(3001, num_rings=3, noise=noise, seed=0)
    counts = torch.bincount(y, minlength=3)
    assert counts.tolist() == [1001, 1000, 1000]
    r = x.norm(dim=1)
    err = (r - (y.float() + 1)).abs()  # default radii 1, 2, 3
    assert err.mean() < 3 * noise
    assert abs(err.mean().item() - noise * math.sqrt(2 / math.pi)) < 0.1 * noise  # E|N(0, s)|
    # Nearest ring recovers the class (rings are 1 apart, noise 0.05).
    assert torch.equal((r.round().long() - 1).clamp(0, 2), y)
    angle = torch.atan2(x[:, 1], x[:, 0])
    hist = torch.histc(angle, bins=8, min=-math.pi, max=math.pi)
    assert hist.min() > 0.8 * 3001 / 8 and hist.max() < 1.2 * 3001 / 8


def test_rings_custom_radii() -> None:
    x, y = rings(400, num_rings=2, radii=[0.5, 4.0], noise=0.01, seed=2)
    r = x.norm(dim=1)
    assert torch.all((r[y == 0] - 0.5).abs() < 0.06)
    assert torch.all((r[y == 1] - 4.0).abs() < 0.06)


# --------------------------------------------------------------------------- stripes


def _axis_profile(img: Tensor, label: int) -> Tensor:
    """The 1-D profile across the stripes: rows for horizontal, columns for vertical."""
    return img[:, 0] if label == 0 else img[0, :]


def test_stripes_are_axis_aligned_by_class() -> None:
    x, y = stripes(400, seed=0)
    assert torch.bincount(y).tolist() == [200, 200]
    img = x[:, 0]
    row_const = (img == img[:, :, :1]).all(dim=2).all(dim=1)
    col_const = (img == img[:, :1, :]).all(dim=1).all(dim=1)
    assert torch.all(row_const[y == 0]) and torch.all(col_const[y == 1])
    # ...and not trivially constant the other way (there is stripe and background).
    assert not torch.any(col_const[y == 0]) and not torch.any(row_const[y == 1])


def test_stripe_widths_gaps_and_values() -> None:
    x, y = stripes(400, seed=1)
    assert x.min() >= 0.0 and x.max() <= 1.0
    widths_seen: list[int] = []
    for img, label in zip(x[:, 0], y.tolist()):
        prof = _axis_profile(img, label)
        runs = _runs((prof > 0).tolist())
        stripe_runs = [r for r in runs if r[2]]
        assert stripe_runs, "every image has at least one stripe"
        for start, length, _ in stripe_runs:
            assert 1 <= length <= 4
            assert torch.all(prof[start : start + length] == prof[start])  # one value per stripe
        # Runs not cut by the border show the full geometry: width w, gap max(w, 2).
        inner = [r for r in runs if r[0] > 0 and r[0] + r[1] < len(prof)]
        inner_w = {length for _, length, on in inner if on}
        inner_g = {length for _, length, on in inner if not on}
        assert len(inner_w) <= 1 and len(inner_g) <= 1
        if inner_w and inner_g:
            (w,), (g,) = inner_w, inner_g
            assert g == max(w, 2)
        widths_seen.extend(inner_w)
    counts = torch.bincount(torch.tensor(widths_seen), minlength=5)[1:]
    assert torch.all(counts > 20)  # every width 1..4 occurs
    values = x[x > 0]
    assert values.min() < 0.05 and values.max() > 0.95 and abs(values.mean() - 0.5) < 0.05


@pytest.mark.parametrize("max_deviation, off_axis_floor", [(30.0, 8.0), (15.0, 20.0)])
def test_diagonal_stripes_are_diagonal(max_deviation, off_axis_floor) -> None:
    """Default 15-75 degrees (the DHM authors' max_deviation=30); max_deviation=15: 30-60."""
    x, y = diagonal_stripes(500, seed=0, max_deviation=max_deviation)
    assert torch.all(y == -1) and x.min() >= 0.0 and x.max() <= 1.0
    img = x[:, 0]
    some_row_varies = (img != img[:, :, :1]).any(dim=2).any(dim=1)
    some_col_varies = (img != img[:, :1, :]).any(dim=1).any(dim=1)
    assert torch.all(some_row_varies) and torch.all(some_col_varies)

    orient = _stripe_orientation_deg(x)
    lo, hi = 45 - max_deviation, 45 + max_deviation
    in_band = ((orient >= lo) & (orient <= hi)) | ((orient >= 180 - hi) & (orient <= 180 - lo))
    # True angles reach the band edges and a 9x9 grid costs a few degrees of accuracy,
    # so a handful of estimates may fall just outside; none may come near the axes.
    assert in_band.double().mean() > 0.98
    off_axis = torch.minimum(torch.minimum(orient, (orient - 90).abs()), 180 - orient)
    assert off_axis.min() > off_axis_floor
    # the band is filled: estimates reach near both of its edges (a 30-60 set fails this at 30)
    dist = torch.minimum(orient, 180 - orient)
    assert dist.min() < lo + 5 and dist.max() > hi - 5
    rising = orient < 90  # "/" versus "\"
    assert 0.4 < rising.double().mean() < 0.6
    assert abs(orient[rising].mean() - 45) < 3 and abs(orient[~rising].mean() - 135) < 3


def test_orientation_estimator_reads_axis_aligned_stripes() -> None:
    """Guards the diagonal test: the same estimator puts ID stripes at exactly 0 / 90 degrees."""
    x, y = stripes(200, seed=0)
    orient = _stripe_orientation_deg(x)
    assert torch.allclose(orient[y == 0], torch.zeros(()).double(), atol=1e-6)
    assert torch.allclose(orient[y == 1], torch.full((), 90.0).double(), atol=1e-6)
