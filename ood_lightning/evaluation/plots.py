"""Pictures that say more than a table: score histograms of ID test against each OOD set, ROC
curves per OOD set, the AUROC heatmap of a sweep. Styled by :mod:`ood_lightning.evaluation.style`."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ood_lightning.evaluation.style import ID_COLOUR, legend, reference, save, styled


def hist_panel(ax, by_split: dict, title: str, xlabel: str | None = None) -> None:
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
            ax.hist(v, bins=bins, density=True, alpha=0.45, color=ID_COLOUR, label="ID test")
        else:
            ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.4, label=split)
    ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    legend(ax, ncol=3)


@styled
def score_histograms(scores: dict[str, dict], path: str | Path) -> Path:
    """One panel per detector (:func:`hist_panel`): ID test scores filled, each OOD set outlined."""
    dets = list(scores)
    fig, axes = plt.subplots(len(dets), 1, figsize=(7, 2.4 * max(1, len(dets))), squeeze=False)
    for ax, det in zip(axes[:, 0], dets):
        by_split = {k: v for k, v in scores[det].items() if k != "id_val" and "|" not in k}
        hist_panel(ax, by_split, f"{det} (higher = in-distribution)", "score (detector's units)")
    return save(fig, path)


@styled
def roc_curves(scores: dict[str, dict], path: str | Path) -> Path:
    """One panel per OOD set: the ROC curve of every detector (ID = positive class), AUROC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    sets = [s for s in dict.fromkeys(k for by in scores.values() for k in by) if s not in ("id_val", "id_test")]
    cols = min(4, max(1, len(sets)))
    rows = -(-len(sets) // cols) if sets else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax, ood in zip(axes.flat, sets):
        for det, by in scores.items():
            if ood not in by or "id_test" not in by:
                continue
            id_s, ood_s = np.asarray(by["id_test"], dtype=np.float64), np.asarray(by[ood], dtype=np.float64)
            y, s = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))], np.nan_to_num(np.r_[id_s, ood_s], neginf=-1e300)
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{det} ({100 * roc_auc_score(y, s):.1f})")
        reference(ax, diagonal=True)
        ax.set_title(f"ID test vs {ood}")
        ax.set_xlabel("FPR (fraction of OOD accepted)")
        ax.set_ylabel("TPR (fraction of ID accepted)")
        legend(ax, loc="lower right", title="detector (AUROC ×100)")
    for ax in list(axes.flat)[len(sets):]:
        ax.remove()
    return save(fig, path)


@styled
def auroc_heatmap(rows: list[dict], path: str | Path, group: str | None = None) -> Path:
    """Mean AUROC of a summary (detectors x OOD sets), each cell annotated with mean ± std;
    ``group`` picks one setting of a sweep (default: the first)."""
    path = Path(path)
    group = group if group is not None else (rows[0]["group"] if rows else "-")
    rows = [r for r in rows if r["group"] == group and "auroc_mean" in r]
    dets = list(dict.fromkeys(r["detector"] for r in rows))
    sets = list(dict.fromkeys(r["ood_set"] for r in rows))
    mean = np.full((len(dets), len(sets)), np.nan)
    std = np.zeros_like(mean)
    for r in rows:
        i, j = dets.index(r["detector"]), sets.index(r["ood_set"])
        mean[i, j], std[i, j] = r["auroc_mean"], r.get("auroc_std", 0.0) or 0.0
    fig, ax = plt.subplots(figsize=(1.2 * len(sets) + 2.5, 0.45 * len(dets) + 1.5))
    im = ax.imshow(100 * mean, vmin=50, vmax=100, aspect="auto")
    ax.grid(False)
    for i in range(len(dets)):
        for j in range(len(sets)):
            if np.isfinite(mean[i, j]):
                ax.text(j, i, f"{100 * mean[i, j]:.1f}±{100 * std[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if mean[i, j] < 0.8 else "black")
    ax.set_xticks(range(len(sets)), sets, rotation=30, ha="right")
    ax.set_yticks(range(len(dets)), dets)
    ax.set_xlabel("OOD set")
    ax.set_ylabel("detector")
    ax.set_title(f"AUROC ×100 (mean ± std over seeds; {group})")
    fig.colorbar(im, ax=ax, fraction=0.03, label="AUROC ×100")
    return save(fig, path)
