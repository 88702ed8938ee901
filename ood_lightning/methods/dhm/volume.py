"""The volume under a learnt 2-D density, by evaluating it on a grid (DHM paper §4.4, Fig. 9/10).

A DHM scores an input x by p(x) := p_flow(normalise(f(x))): a density over the *feature*
space pulled back through the encoder f. It is a density over the input space only when f is
a volume-preserving bijection, which an encoder is not, so its integral over the inputs need not
be 1; how far it is from 1, as a function of the spectral coefficient c that bounds f's
Lipschitz constant, is what Schlumbom & Frank plot (Fig. 10). Here the integral over a
rectangle is computed with the 2-D trapezoid rule (``np.trapezoid`` along x, then along y: the
same as averaging the four corners of every cell, as the paper's code does).

The densities of a collapsed model can be e^1000 or e^-1000, beyond float range, so values are
handled as log-densities: the volume is ``exp(m) · ∫ exp(log p − m)`` with m the grid maximum,
and :class:`GridDensity` keeps ``log_volume`` too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz

LogDensity = Callable[[Tensor], Tensor]


@dataclass
class GridDensity:
    """A log-density on a regular grid: ``log_density[i, j]`` at ``(xs[j], ys[i])``."""

    xs: np.ndarray
    ys: np.ndarray
    log_density: np.ndarray
    log_volume: float

    @property
    def volume(self) -> float:
        """∫∫ p over the grid's rectangle (inf when it overflows float64; see ``log_volume``)."""
        return math.exp(self.log_volume) if self.log_volume < 709 else math.inf

    @property
    def density(self) -> np.ndarray:
        return np.exp(self.log_density)

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """(x0, x1, y0, y1) for ``plt.imshow(..., extent=..., origin="lower")``."""
        return float(self.xs[0]), float(self.xs[-1]), float(self.ys[0]), float(self.ys[-1])


def grid_points(xlim: tuple[float, float], ylim: tuple[float, float], n: int | tuple[int, int] = 200
                ) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """``xs`` (nx), ``ys`` (ny) and the ``[ny · nx, 2]`` points, row by row (y outer, x inner)."""
    nx, ny = (n, n) if isinstance(n, int) else n
    if nx < 2 or ny < 2:
        raise ValueError(f"a grid needs at least 2 points per axis, got {nx} x {ny}")
    xs, ys = np.linspace(*xlim, nx), np.linspace(*ylim, ny)
    gx, gy = np.meshgrid(xs, ys)  # [ny, nx]
    return xs, ys, torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)


def trapezoid_log_volume(log_values: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> float:
    """log ∫∫ exp(log_values) dx dy by the trapezoid rule over both axes (``log_values`` is [ny, nx]).

    -inf where the density is 0 everywhere; NaN values make the result NaN.
    """
    log_values = np.asarray(log_values, dtype=np.float64)
    if log_values.shape != (len(ys), len(xs)):
        raise ValueError(f"values of shape {log_values.shape} do not match the grid ({len(ys)}, {len(xs)})")
    if np.isnan(log_values).any():
        return float("nan")
    m = float(np.max(log_values))
    if not np.isfinite(m):
        return m  # -inf: zero density everywhere; +inf: unbounded
    inner = _trapezoid(_trapezoid(np.exp(log_values - m), xs, axis=1), ys)
    return m + math.log(inner) if inner > 0 else float("-inf")


@torch.no_grad()
def evaluate_on_grid(log_density: LogDensity, xlim: tuple[float, float], ylim: tuple[float, float],
                     n: int | tuple[int, int] = 200, batch_size: int = 4096,
                     device: torch.device | str = "cpu") -> GridDensity:
    """``log_density`` (a map ``[B, 2] -> [B]``) on an ``n`` x ``n`` grid over the rectangle, and its volume."""
    xs, ys, points = grid_points(xlim, ylim, n)
    out = [log_density(chunk.to(device)).detach().double().cpu() for chunk in points.split(batch_size)]
    log_p = torch.cat(out).numpy().reshape(len(ys), len(xs))
    return GridDensity(xs, ys, log_p, trapezoid_log_volume(log_p, xs, ys))


def grid_volume(log_density: LogDensity, xlim: tuple[float, float], ylim: tuple[float, float],
                n: int | tuple[int, int] = 200, **kwargs) -> float:
    """∫∫ exp(log_density) over the rectangle (see :func:`evaluate_on_grid`)."""
    return evaluate_on_grid(log_density, xlim, ylim, n, **kwargs).volume


def input_log_density(model) -> LogDensity:
    """x -> log p_flow(normalise(f(x))) of a DHM-like model (``backbone`` + ``log_density(features)``),
    in eval mode: the density the model assigns to *inputs*, whose volume this module measures."""
    model.eval()
    device = next(model.parameters()).device

    def log_p(x: Tensor) -> Tensor:
        return model.log_density(model.backbone(x.to(device)))

    return log_p


def data_limits(x: Tensor | np.ndarray, margin: float = 0.5) -> tuple[tuple[float, float], tuple[float, float]]:
    """The bounding box of 2-D points, widened by ``margin`` times its larger side on every edge."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = x.min(0), x.max(0)
    pad = margin * float((hi - lo).max())
    return (float(lo[0] - pad), float(hi[0] + pad)), (float(lo[1] - pad), float(hi[1] + pad))
