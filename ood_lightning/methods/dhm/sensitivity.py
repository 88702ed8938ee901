"""Sensitivity and smoothness of a feature extractor (DHM paper §4.5, Table 2).

A distance-aware extractor maps small input changes to small feature changes and large ones
to large ones. The study perturbs inputs x with random δ of growing norm ε = ‖δ‖₂ and measures
the deviation ‖g(f(x+δ)) − g(f(x))‖₂ of the features after each normalisation g (none, l1, l2,
l∞, as fed to the flow); a least-squares line through the (ε, deviation) pairs gives the
*slope* (sensitivity) and Pearson's r (how linear, i.e. smooth, the relation is).

Choices (the paper gives none): δ = ε·u with u uniform on the unit sphere of the input space
(a normalised Gaussian), one fresh direction per input and norm; ε on a linear grid from 0
to ``max_norm``; deviations in the l2 norm for every g, so that slopes are comparable; the
line has an intercept (``np.polyfit`` degree 1). Because normalisations rescale the features,
``relative_slope`` = slope / mean ‖g(f(x))‖₂ is reported too. Perturbations are applied to the
model's inputs (after preprocessing), without clipping to the valid pixel range.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import pearsonr
from torch import Tensor

from ood_lightning.nn.feature_norm import NORMS, normalize_features


@dataclass
class Sensitivity:
    """The fit for one feature normalisation."""

    norm: str
    slope: float
    intercept: float
    pearson_r: float
    relative_slope: float
    mean_feature_norm: float
    n_pairs: int

    def as_dict(self) -> dict:
        return asdict(self)


def random_directions(shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
    """``shape[0]`` unit vectors (l2 over all other dimensions), uniform on the sphere."""
    u = torch.randn(tuple(shape), generator=generator)
    return u / u.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (u.ndim - 1)))


def fit_line(eps: np.ndarray, dev: np.ndarray) -> tuple[float, float, float]:
    """(slope, intercept) of the least-squares line dev ≈ slope·eps + intercept, and Pearson r."""
    eps, dev = np.asarray(eps, dtype=np.float64), np.asarray(dev, dtype=np.float64)
    slope, intercept = np.polyfit(eps, dev, 1)
    r = float(pearsonr(eps, dev).statistic) if np.ptp(dev) > 0 and np.ptp(eps) > 0 else float("nan")
    return float(slope), float(intercept), r


@torch.no_grad()
def deviations(f: Callable[[Tensor], Tensor], x: Tensor, max_norm: float = 1.0, n_norms: int = 11,
               norms: Sequence[str] = tuple(NORMS), seed: int = 0, batch_size: int = 256
               ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    """Perturbation norms ε [N·K], feature deviations per normalisation [N·K], and mean ‖g(f(x))‖₂.

    Every input x_i gets each of the K = ``n_norms`` norms in ``linspace(0, max_norm, K)`` with
    its own random direction.
    """
    gen = torch.Generator().manual_seed(seed)
    levels = torch.linspace(0.0, float(max_norm), n_norms)
    eps_all: list[Tensor] = []
    dev_all: dict[str, list[Tensor]] = {k: [] for k in norms}
    feat_norm: dict[str, list[Tensor]] = {k: [] for k in norms}
    for chunk in x.split(batch_size):
        h0 = f(chunk).flatten(1).float()
        for k in norms:
            feat_norm[k].append(normalize_features(h0, k).norm(dim=1).cpu())
        for eps in levels:
            delta = eps * random_directions(chunk.shape, gen).to(chunk)
            h1 = f(chunk + delta).flatten(1).float()
            eps_all.append(torch.full((len(chunk),), float(eps)))
            for k in norms:
                dev_all[k].append((normalize_features(h1, k) - normalize_features(h0, k)).norm(dim=1).cpu())
    eps_np = torch.cat(eps_all).double().numpy()
    return (eps_np, {k: torch.cat(v).double().numpy() for k, v in dev_all.items()},
            {k: float(torch.cat(v).mean()) for k, v in feat_norm.items()})


def sensitivity(f: Callable[[Tensor], Tensor], x: Tensor, max_norm: float = 1.0, n_norms: int = 11,
                norms: Sequence[str] = tuple(NORMS), seed: int = 0, batch_size: int = 256) -> dict[str, Sensitivity]:
    """Slope and Pearson r of feature deviation against perturbation norm, per normalisation."""
    eps, devs, scale = deviations(f, x, max_norm, n_norms, norms, seed, batch_size)
    out = {}
    for k in norms:
        slope, intercept, r = fit_line(eps, devs[k])
        out[k] = Sensitivity(k, slope, intercept, r, slope / scale[k] if scale[k] > 0 else float("nan"),
                             scale[k], len(eps))
    return out


def to_markdown(rows: dict[str, Sensitivity], title: str = "") -> str:
    """Table-2-style: one line per normalisation."""
    lines = [f"{title}\n" if title else "",
             "| normalisation | slope | relative slope | Pearson r | mean ‖g(f(x))‖₂ | pairs |",
             "|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r.norm} | {r.slope:.4g} | {r.relative_slope:.4g} | {r.pearson_r:.4f} | "
                     f"{r.mean_feature_norm:.4g} | {r.n_pairs} |")
    return "\n".join(line for line in lines if line) + "\n"
