"""Pictures that say more than a table: score histograms of ID test against each OOD set."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def score_histograms(scores: dict[str, dict], path: str | Path) -> Path:
    """One panel per detector: ID test scores filled, each OOD set as an outline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dets = list(scores)
    fig, axes = plt.subplots(len(dets), 1, figsize=(7, 2.4 * max(1, len(dets))), squeeze=False)
    for ax, det in zip(axes[:, 0], dets):
        by_split = {k: np.asarray(v, dtype=np.float64) for k, v in scores[det].items() if k != "id_val"}
        finite = np.concatenate([v[np.isfinite(v)] for v in by_split.values()])
        lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
        for split, v in by_split.items():
            v = np.clip(v[np.isfinite(v)], lo, hi)
            if split == "id_test":
                ax.hist(v, bins=bins, density=True, alpha=0.45, color="black", label="ID test")
            else:
                ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.4, label=split)
        ax.set_title(f"{det} (higher = in-distribution)", fontsize=9)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
