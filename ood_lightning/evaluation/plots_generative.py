"""Pictures of a generative model: image grids (samples, reconstructions, latent walks),
ELBO components of ID vs OOD inputs (seed thesis Fig. 3.8) and the latent probe's signed
distances. A person judges a generative model by looking; these are what they look at.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torchvision.utils import make_grid

from ood_lightning.evaluation.plots import hist_panel
from ood_lightning.evaluation.style import reference, save, styled


def _grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> an HxWx3 (or HxW for grey) array."""
    images = images.detach().float().cpu().clamp(0, 1)
    grid = make_grid(images, nrow=nrow, padding=1, pad_value=1.0)
    return grid[0].numpy() if images.shape[1] == 1 else grid.permute(1, 2, 0).numpy()


@styled
def save_image_panels(panels: Mapping[str, torch.Tensor], path: str | Path, nrow: int = 8,
                      title: str | None = None) -> Path:
    """One titled grid per entry of ``panels`` (name -> images [N, C, H, W] in [0, 1]), stacked."""
    grids = {k: _grid(v, nrow) for k, v in panels.items() if len(v)}
    fig, axes = plt.subplots(len(grids), 1, figsize=(min(12, 1.1 * nrow + 1), 1 + sum(
        1.1 * g.shape[0] / g.shape[1] * nrow for g in grids.values())), squeeze=False)
    for ax, (name, grid) in zip(axes[:, 0], grids.items()):
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    return save(fig, path, title)


#: the ELBO components shown, with their axis titles
COMPONENT_TITLES = {
    "rec": "reconstruction term E_q log p(x|z) / D  (nats/dim)",
    "mu_sq": "prior term ||mu||^2",
    "logvar_sum": "posterior entropy term sum log sigma^2",
    "kl": "KL(q(z|x) || p(z))  (nats)",
}


@styled
def elbo_component_histograms(components: Mapping[str, Mapping[str, np.ndarray]], path: str | Path,
                              title: str | None = None) -> Path:
    """``components[split][name]`` per input, one panel per component: ID test filled, OOD outlined."""
    names = [n for n in COMPONENT_TITLES if all(n in c for c in components.values())]
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.6 + 0.16 * len(components)), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes[0], names):
        hist_panel(ax, {split: c[name] for split, c in components.items()}, COMPONENT_TITLES[name],
                   legend_below_axis=True)
    return save(fig, path, title)


@styled
def probe_distance_histograms(probes: Mapping, path: str | Path) -> Path:
    """One panel per OOD set: held-out signed distances to the SVM hyperplane (positive = ID side)."""
    fig, axes = plt.subplots(1, len(probes), figsize=(4.6 * len(probes), 4.0), squeeze=False, layout="constrained")
    for ax, (ood, p) in zip(axes[0], probes.items()):
        hist_panel(ax, {"id_test": p.distances_id, ood: p.distances_ood},
                    f"{ood}: pos {p.positive_accuracy:.3f} / neg {p.negative_accuracy:.3f}",
                    "signed distance to the hyperplane (latent units)", legend_below_axis=True)
        reference(ax, x=0.0)
    return save(fig, path, "linear SVM on latent means (held-out inputs)")
