"""Pictures that say more than a table: score histograms of ID test against each OOD set, ROC
curves per OOD set, the AUROC heatmap of a sweep. Styled by :mod:`ood_lightning.evaluation.style`.

Scores come as ``scores[detector][split]``; a detector tuned on each OOD set (its scores of
that set's fit, ``Key.tuned_for``) has ``id_test@<set>`` and ``<set>@<set>`` instead of one
``id_test``, as in ``scores.npz``.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import Normalize

from ood_lightning.evaluation.style import (
    ID_COLOUR,
    RC,
    legend_below,
    legend_beside,
    reference,
    save,
    series_style,
    styled,
    wrap,
)

#: the AUROC of a detector no better than chance (×100)
CHANCE = 50.0


def _off_axis_note(below: int, above: int, n: int) -> str:
    """E.g. " (256 of 256 off the axis, left)": how many values of a split the axis does not show."""
    if not below and not above:
        return ""
    where = "left" if not above else "right" if not below else f"{below} left, {above} right"
    return f" ({below + above} of {n} off the axis, {where})"


def hist_panel(ax, by_split: dict, title: str, xlabel: str | None = None, legend_below_axis: bool = False) -> None:
    """ID test values filled, every other split outlined, on an axis around the ID range.

    The axis spans the ID values' range plus as much again on each side, so heavy tails
    (Mahalanobis) do not squash the overlap. Values beyond it are not drawn: each split's legend
    entry says how many lie off the axis, and on which side. Densities are per value of the
    whole split, so a split half off the axis has half the area. The legend lies outside the axis:
    beside it (a column of panels) or below it (``legend_below_axis``: a row of panels).
    """
    values = {k: np.asarray(v, dtype=np.float64) for k, v in by_split.items()}
    finite = np.concatenate([v[np.isfinite(v)] for v in values.values()] or [np.zeros(1)])
    ref = values.get("id_test", finite)
    ref = ref[np.isfinite(ref)]
    lo, hi = np.percentile(ref, [0.5, 99.5]) if ref.size else (0.0, 1.0)
    spread = hi - lo
    lo, hi = max(lo - spread, finite.min(initial=lo)), min(hi + spread, finite.max(initial=hi))
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
    width = bins[1] - bins[0]
    for split, v in values.items():
        v = v[~np.isnan(v)]
        shown = v[(v >= bins[0]) & (v <= bins[-1])]
        note = _off_axis_note(int((v < bins[0]).sum()), int((v > bins[-1]).sum()), v.size)
        weights = np.full(shown.size, 1.0 / (max(v.size, 1) * width))
        if split == "id_test":
            ax.hist(shown, bins=bins, weights=weights, alpha=0.45, color=ID_COLOUR, label="ID test" + note)
        else:
            ax.hist(shown, bins=bins, weights=weights, histtype="step", linewidth=1.4, label=split + note)
    ax.set_xlim(bins[0], bins[-1])
    ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    (legend_below if legend_below_axis else legend_beside)(ax, **({"ncol": 1} if legend_below_axis else {}))


def _tuned_sets(by_split: dict) -> list[str]:
    """The OOD sets a detector was tuned on (its ``<set>@<set>`` keys)."""
    return [k.partition("@")[2] for k in by_split if "@" in k and k.partition("@")[0] not in ("id_test", "id_val")]


def _pair(by_split: dict, ood: str):
    """(ID test, OOD) scores of a detector for ``ood``, from its fit tuned on that set if it has one;
    None when it did not score ``ood``."""
    id_s, ood_s = by_split.get(f"id_test@{ood}", by_split.get("id_test")), by_split.get(f"{ood}@{ood}", by_split.get(ood))
    return None if id_s is None or ood_s is None else (id_s, ood_s)


@styled
def score_histograms(scores: dict[str, dict], path: str | Path) -> Path:
    """One panel per detector (:func:`hist_panel`): ID test scores filled, each OOD set outlined;
    a detector tuned on each OOD set gets one panel per set."""
    panels = []
    for det, by in scores.items():
        tuned = _tuned_sets(by)
        if tuned:
            panels += [(f"{det}, tuned on part of {ood} (higher = in-distribution)",
                        {"id_test": by[f"id_test@{ood}"], ood: by[f"{ood}@{ood}"]}) for ood in tuned]
        else:
            panels.append((f"{det} (higher = in-distribution)",
                           {k: v for k, v in by.items() if k != "id_val" and "|" not in k}))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.4 * max(1, len(panels))), squeeze=False,
                             layout="constrained")
    for ax, (title, by_split) in zip(axes[:, 0], panels):
        hist_panel(ax, by_split, title, "score (detector's units)")
    return save(fig, path)


@styled
def roc_curves(scores: dict[str, dict], path: str | Path) -> Path:
    """One panel per OOD set: the ROC curve of every detector that scored it (ID = positive class;
    a detector tuned on OOD data from its fit on that set), AUROC in the legend below the panel."""
    from sklearn.metrics import roc_auc_score, roc_curve

    splits = dict.fromkeys(k.partition("@")[0] for by in scores.values() for k in by)
    sets = [s for s in splits if s not in ("id_val", "id_test")]
    cols = min(4, max(1, len(sets)))
    rows = -(-len(sets) // cols) if sets else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, (3.9 + 0.15 * len(scores)) * rows), squeeze=False,
                             layout="constrained")
    for ax, ood in zip(axes.flat, sets):
        for i, (det, by) in enumerate(scores.items()):
            pair = _pair(by, ood)
            if pair is None:
                continue
            id_s, ood_s = (np.asarray(p, dtype=np.float64) for p in pair)
            y, s = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))], np.nan_to_num(np.r_[id_s, ood_s], neginf=-1e300)
            fpr, tpr, _ = roc_curve(y, s)
            tuned = ", uses OOD data" if f"{ood}@{ood}" in by else ""
            ax.plot(fpr, tpr, label=f"{det}{tuned} ({100 * roc_auc_score(y, s):.1f})", **series_style(i))
        reference(ax, diagonal=True)
        ax.set_title(f"ID test vs {ood}")
        ax.set_xlabel("FPR (fraction of OOD accepted)")
        ax.set_ylabel("TPR (fraction of ID accepted)")
        legend_below(ax, ncol=1, title="detector (AUROC ×100)")
    for ax in list(axes.flat)[len(sets):]:
        ax.remove()
    return save(fig, path)


def _text_colour(rgba) -> str:
    """Black on a light cell, white on a dark one (relative luminance)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


@styled
def auroc_heatmap(rows: list[dict], path: str | Path) -> Path:
    """Mean AUROC ×100 of a summary (detectors × OOD sets), one panel per setting of a sweep, each
    cell the mean ± std over seeds (a single run's value alone). The colour scale runs from 50
    (chance), or lower when a cell is below chance, to 100; the overrides every run shares and the
    settings' names are the caption (:func:`~ood_lightning.evaluation.aggregate.setting_legend`)."""
    from ood_lightning.evaluation.aggregate import setting_legend

    rows = [r for r in rows if "auroc_mean" in r]
    legend = setting_legend(rows)
    groups = list(legend.labels)
    dets = list(dict.fromkeys(r["detector"] for r in rows))
    sets = list(dict.fromkeys(r["ood_set"] for r in rows))
    lowest = min((100 * r["auroc_mean"] for r in rows if np.isfinite(r["auroc_mean"])), default=CHANCE)
    norm = Normalize(vmin=min(CHANCE, 10 * math.floor(lowest / 10)), vmax=100)
    cols = min(3, max(1, len(groups)))
    n_rows = -(-len(groups) // cols) if groups else 1
    width = cols * (1.0 * len(sets) + 2.2) + 1.2
    fig, axes = plt.subplots(n_rows, cols, figsize=(width, n_rows * (0.42 * len(dets) + 1.7) + 1.0),
                             squeeze=False, layout="constrained")
    cmap = plt.get_cmap(RC["image.cmap"])
    for ax, group in zip(axes.flat, groups):
        mean, std, n = np.full((len(dets), len(sets)), np.nan), np.zeros((len(dets), len(sets))), np.ones((len(dets), len(sets)))
        for r in rows:
            if r["group"] == group:
                i, j = dets.index(r["detector"]), sets.index(r["ood_set"])
                mean[i, j], std[i, j], n[i, j] = 100 * r["auroc_mean"], 100 * (r.get("auroc_std") or 0.0), r["n"]
        im = ax.imshow(mean, cmap=cmap, norm=norm, aspect="auto")
        ax.grid(False)
        for i in range(len(dets)):
            for j in range(len(sets)):
                if np.isfinite(mean[i, j]):
                    text = f"{mean[i, j]:.1f}" + (f"±{std[i, j]:.1f}" if n[i, j] > 1 else "")
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color=_text_colour(cmap(norm(mean[i, j]))))
        ax.set_xticks(range(len(sets)), sets, rotation=30, ha="right")
        ax.set_yticks(range(len(dets)), dets)
        ax.set_xlabel("OOD set")
        if ax in axes[:, 0]:
            ax.set_ylabel("detector")
        ax.set_title(wrap(legend.labels[group] if legend.several else "every run", width / cols))
    for ax in list(axes.flat)[len(groups):]:
        ax.remove()
    bar = fig.colorbar(im, ax=list(axes.flat[:len(groups)]), fraction=0.05, label="AUROC ×100 (50 = chance)")
    bar.ax.axhline(CHANCE, color="white", linewidth=1)
    runs = max((r["n"] for r in rows), default=0)
    spread = "one run per setting: no spread" if runs == 1 else f"mean ± std over up to {runs} seeds per setting"
    fig.suptitle(wrap(f"AUROC ×100 ({spread})", width, RC["figure.titlesize"]))
    caption = [f"every run: {' '.join(legend.common)}"] if legend.common else []
    caption += [f"{label}: {legend.differing[g]}" for g, label in legend.labels.items() if label != legend.differing[g]]
    if caption:
        fig.supxlabel("\n".join(wrap(line, width, 8) for line in caption), fontsize=8, ha="left", x=0.02)
    return save(fig, path)
