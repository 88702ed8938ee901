"""Pictures that say more than a table: score histograms of ID test against each OOD set."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def score_histograms(scores: dict[str, dict], path: str | Path) -> Path:
    """One panel per detector: ID test scores filled, each OOD set as an outline.

    The axis spans the ID scores' range plus as much again on each side; OOD scores beyond
    it pile up in the edge bins, so heavy tails (Mahalanobis) do not squash the overlap.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dets = list(scores)
    fig, axes = plt.subplots(len(dets), 1, figsize=(7, 2.4 * max(1, len(dets))), squeeze=False)
    for ax, det in zip(axes[:, 0], dets):
        by_split = {k: np.asarray(v, dtype=np.float64) for k, v in scores[det].items()
                    if k != "id_val" and "|" not in k}
        finite = np.concatenate([v[np.isfinite(v)] for v in by_split.values()])
        ref = by_split.get("id_test", finite)
        ref = ref[np.isfinite(ref)]
        lo, hi = np.percentile(ref, [0.5, 99.5]) if ref.size else (0.0, 1.0)
        spread = hi - lo
        lo, hi = max(lo - spread, finite.min(initial=lo)), min(hi + spread, finite.max(initial=hi))
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
