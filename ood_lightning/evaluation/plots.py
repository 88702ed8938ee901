"""Pictures that say more than a table: score histograms of ID test against each OOD set."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def hist_panel(ax, by_split: dict, title: str) -> None:
    """ID test values filled, every other split outlined, on an axis around the ID range.

    The axis spans the ID values' range plus as much again on each side; values beyond it
    pile up in the edge bins, so heavy tails (Mahalanobis) do not squash the overlap.
    """
    values = {k: np.asarray(v, dtype=np.float64) for k, v in by_split.items()}
    finite = np.concatenate([v[np.isfinite(v)] for v in values.values()] or [np.zeros(1)])
    ref = values.get("id_test", finite)
    ref = ref[np.isfinite(ref)]
    lo, hi = np.percentile(ref, [0.5, 99.5]) if ref.size else (0.0, 1.0)
    spread = hi - lo
    lo, hi = max(lo - spread, finite.min(initial=lo)), min(hi + spread, finite.max(initial=hi))
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
    for split, v in values.items():
        v = np.clip(v[np.isfinite(v)], bins[0], bins[-1])
        if split == "id_test":
            ax.hist(v, bins=bins, density=True, alpha=0.45, color="black", label="ID test")
        else:
            ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.4, label=split)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3)


def score_histograms(scores: dict[str, dict], path: str | Path) -> Path:
    """One panel per detector (:func:`hist_panel`): ID test scores filled, each OOD set outlined."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dets = list(scores)
    fig, axes = plt.subplots(len(dets), 1, figsize=(7, 2.4 * max(1, len(dets))), squeeze=False)
    for ax, det in zip(axes[:, 0], dets):
        by_split = {k: v for k, v in scores[det].items() if k != "id_val" and "|" not in k}
        hist_panel(ax, by_split, f"{det} (higher = in-distribution)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
