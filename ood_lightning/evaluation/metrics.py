"""OOD-detection metrics with one sign convention, so no caller has to remember which way a score points.

Convention used everywhere in this module: an OOD score is *higher = more in-distribution*, and ID is
the POSITIVE class. A detector "accepts" an input as ID when ``score >= threshold``. Inputs are 1-D
numpy arrays (torch tensors are accepted and moved to the CPU); non-finite or empty inputs raise
``ValueError`` rather than silently producing a meaningless number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score, roc_curve

__all__ = [
    "aupr_in",
    "aupr_out",
    "auroc",
    "autc",
    "detection_error",
    "format_mean_std",
    "fpr_at_tpr",
    "mean_std",
    "ood_metrics",
    "open_set_macro_f1",
    "threshold_at_tpr",
    "tnr_at_tpr",
]

ArrayLike = Any  # numpy array, torch tensor, or sequence of numbers


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """Turn a tensor/array/list into a numpy array."""
    if isinstance(x, torch.Tensor):  # possibly on GPU, possibly requiring grad
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_scores(x: ArrayLike, name: str) -> np.ndarray:
    """Validate one score vector: a silent NaN would make every metric below quietly wrong."""
    arr = _to_numpy(x).astype(np.float64, copy=False)
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array of per-sample scores, got shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(
            f"{name} are empty: need at least one score to evaluate the detector"
        )
    if np.isnan(arr).any():
        raise ValueError(f"{name} contain NaN: the detector produced non-finite values")
    if np.isinf(arr).any():
        raise ValueError(f"{name} contain inf: the detector produced non-finite values")
    return arr


def _check_pair(
    id_scores: ArrayLike, ood_scores: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    return _check_scores(id_scores, "ID scores"), _check_scores(
        ood_scores, "OOD scores"
    )


def _labels_and_scores(
    id_s: np.ndarray, ood_s: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Stack into sklearn's (y_true, y_score) with ID = 1 (the positive class)."""
    y = np.concatenate(
        [np.ones(id_s.size, dtype=np.int64), np.zeros(ood_s.size, dtype=np.int64)]
    )
    return y, np.concatenate([id_s, ood_s])


def _check_tpr(tpr: float) -> float:
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    return float(tpr)


# --------------------------------------------------------------------------------------------------
# Threshold-free ranking metrics
# --------------------------------------------------------------------------------------------------


def auroc(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Area under the ROC curve, ID positive: P(score_ID > score_OOD) with ties counted as 1/2."""
    id_s, ood_s = _check_pair(id_scores, ood_scores)
    y, s = _labels_and_scores(id_s, ood_s)
    return float(roc_auc_score(y, s))


def aupr_in(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with ID as the positive class (how cleanly the top of the ranking is ID)."""
    id_s, ood_s = _check_pair(id_scores, ood_scores)
    y, s = _labels_and_scores(id_s, ood_s)
    return float(average_precision_score(y, s))


def aupr_out(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with OOD as the positive class, ranking by the negated score."""
    id_s, ood_s = _check_pair(id_scores, ood_scores)
    y, s = _labels_and_scores(id_s, ood_s)
    return float(average_precision_score(1 - y, -s))


# --------------------------------------------------------------------------------------------------
# Operating-point metrics
# --------------------------------------------------------------------------------------------------


def threshold_at_tpr(val_id_scores: ArrayLike, tpr: float = 0.95) -> float:
    """Threshold that keeps at least ``tpr`` of the ID data, for deploying a detector.

    Definition (shared with :func:`fpr_at_tpr`): ``t`` is the LARGEST value with
    ``mean(id_scores >= t) >= tpr``. It is always one of the ID scores: the ``ceil(tpr * N)``-th
    largest. Being the largest such value makes the resulting FPR as small as the TPR constraint
    allows; ties at ``t`` are all accepted, so the realised TPR can exceed ``tpr``.
    """
    tpr = _check_tpr(tpr)
    s = _check_scores(val_id_scores, "ID scores")
    n = s.size
    # round() guards against e.g. 0.55 * 100 == 55.00000000000001 turning ceil() into 56.
    k = max(1, math.ceil(round(tpr * n, 9)))
    return float(np.sort(s)[::-1][k - 1])


def fpr_at_tpr(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95) -> float:
    """Fraction of OOD accepted (score >= t) at the threshold that keeps ``tpr`` of ID (FPR@95).

    ``t = threshold_at_tpr(id_scores, tpr)``: the largest value with ``mean(id >= t) >= tpr``.
    OOD scores tied with ``t`` count as false positives (pessimistic, matching the ``>=`` rule).
    No interpolation between ROC points is done, so the number is reproducible from the raw scores.
    """
    id_s, ood_s = _check_pair(id_scores, ood_scores)
    t = threshold_at_tpr(id_s, tpr)
    return float(np.mean(ood_s >= t))


def tnr_at_tpr(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95) -> float:
    """Fraction of OOD rejected at the same threshold as :func:`fpr_at_tpr` (``1 - FPR``)."""
    return 1.0 - fpr_at_tpr(id_scores, ood_scores, tpr)


def detection_error(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Best balanced error ``min_t 0.5 * (1 - TPR(t)) + 0.5 * FPR(t)`` over all thresholds.

    The minimum runs over every distinct score plus "accept nothing"; accepting everything or
    nothing both cost 0.5, so it is at most 0.5, and it is 0 only for perfect separation. Equal class weights make it independent of the
    ID/OOD sample ratio.
    """
    id_s, ood_s = _check_pair(id_scores, ood_scores)
    y, s = _labels_and_scores(id_s, ood_s)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr))


# --------------------------------------------------------------------------------------------------
# AuTC
# --------------------------------------------------------------------------------------------------


def autc(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Area under the Threshold Curve (Humblot-Renaux et al., CVPR 2023 workshops); LOWER is better.

    Unlike AUROC, AuTC also rewards a *gap* between the ID and OOD score distributions, i.e. how
    forgiving the detector is to the choice of threshold. Scores are min-max normalised to
    ``[0, 1]`` over the union of ID and OOD, then

        AuTC = 0.5 * (∫_0^1 FPR(t) dt + ∫_0^1 FNR(t) dt),
        FPR(t) = mean(ood_norm >= t),   FNR(t) = mean(id_norm < t).

    Both integrands are step functions, so the integrals are exact closed forms:
    ``∫ FPR = mean(ood_norm)`` and ``∫ FNR = mean(1 - id_norm)``.

    Limits: 0 when ID and OOD are perfectly separated with the maximal gap (all ID at the max
    score, all OOD at the min); exactly 0.5 when ID and OOD scores are identical samples (and
    about 0.5 for samples from one distribution); 1 for the fully inverted case. If every score is
    equal the scores carry no information and 0.5 is returned.

    Note: the paper defines AuTC on scores already in ``[0, 1]`` and its reference code integrates
    with the trapezoid rule over the sample points; here unbounded scores (energy, log-likelihood)
    are min-max normalised as described, and the integral is computed exactly. Min-max
    normalisation makes AuTC sensitive to outlying scores, which is part of what it measures.
    """
    id_s, ood_s = _check_pair(id_scores, ood_scores)
    lo = min(id_s.min(), ood_s.min())
    hi = max(id_s.max(), ood_s.max())
    span = hi - lo
    if span == 0.0:
        return 0.5
    id_n = (id_s - lo) / span
    ood_n = (ood_s - lo) / span
    au_fpr = float(np.mean(ood_n))
    au_fnr = float(np.mean(1.0 - id_n))
    return 0.5 * (au_fpr + au_fnr)


# --------------------------------------------------------------------------------------------------
# Open-set classification
# --------------------------------------------------------------------------------------------------


def _as_preds(x: ArrayLike, name: str, num_classes: int) -> np.ndarray:
    """Accept either class indices [N] or logits [N, C] (argmax taken)."""
    arr = _to_numpy(x)
    if arr.ndim == 2:
        if arr.shape[1] != num_classes:
            raise ValueError(
                f"{name} logits have {arr.shape[1]} columns, expected num_classes={num_classes}"
            )
        arr = arr.argmax(axis=1)
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be class indices [N] or logits [N, C], got shape {arr.shape}"
        )
    if (
        arr.size
        and not np.issubdtype(arr.dtype, np.integer)
        and not np.all(np.mod(arr, 1) == 0)
    ):
        raise ValueError(f"{name} must be integer class indices")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes - 1}], got range [{arr.min()}, {arr.max()}]"
        )
    return arr


def open_set_macro_f1(
    id_preds: ArrayLike,
    id_labels: ArrayLike,
    id_scores: ArrayLike,
    ood_preds: ArrayLike,
    ood_scores: ArrayLike,
    threshold: float,
    num_classes: int,
) -> float:
    """Macro-F1 over C known classes plus "unknown" (label C): classification and rejection together.

    An input is accepted when ``score >= threshold`` and then gets its closed-set prediction
    (argmax if logits are given); otherwise it is predicted "unknown". Every OOD input's true label
    is C. The average runs over labels ``0..C``; a class absent from both truth and predictions has
    undefined F1 and is left out of the average (rather than counted as 0) so that small evaluation
    sets are not penalised for classes they simply do not contain.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    id_s, ood_s = _check_pair(id_scores, ood_scores)
    id_p = _as_preds(id_preds, "id_preds", num_classes)
    id_y = _as_preds(id_labels, "id_labels", num_classes)
    ood_p = _as_preds(ood_preds, "ood_preds", num_classes)
    if not (id_p.size == id_y.size == id_s.size):
        raise ValueError(
            f"ID lengths differ: preds {id_p.size}, labels {id_y.size}, scores {id_s.size}"
        )
    if ood_p.size != ood_s.size:
        raise ValueError(f"OOD lengths differ: preds {ood_p.size}, scores {ood_s.size}")
    unknown = num_classes
    y_true = np.concatenate([id_y, np.full(ood_s.size, unknown, dtype=np.int64)])
    y_pred = np.concatenate(
        [
            np.where(id_s >= threshold, id_p, unknown),
            np.where(ood_s >= threshold, ood_p, unknown),
        ]
    )
    return float(
        f1_score(
            y_true,
            y_pred,
            labels=list(range(num_classes + 1)),
            average="macro",
            zero_division=np.nan,
        )
    )


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


def ood_metrics(id_scores: ArrayLike, ood_scores: ArrayLike) -> dict[str, float]:
    """All standard metrics for one (ID, OOD) pair, validated once; keys are stable for logging."""
    id_s, ood_s = _check_pair(id_scores, ood_scores)
    fpr95 = fpr_at_tpr(id_s, ood_s, 0.95)
    return {
        "auroc": auroc(id_s, ood_s),
        "aupr_in": aupr_in(id_s, ood_s),
        "aupr_out": aupr_out(id_s, ood_s),
        "fpr95": fpr95,
        "tnr95": 1.0 - fpr95,
        "detection_error": detection_error(id_s, ood_s),
        "autc": autc(id_s, ood_s),
    }


def mean_std(values: Sequence[float] | ArrayLike) -> tuple[float, float]:
    """Mean and sample std (ddof=1) across seeds; std is 0.0 for one run instead of NaN."""
    arr = _to_numpy(values).astype(np.float64).ravel()
    if arr.size == 0:
        raise ValueError("mean_std needs at least one value")
    std = float(np.std(arr, ddof=1)) if arr.size > 1 else 0.0
    return float(np.mean(arr)), std


def format_mean_std(
    values: Sequence[float] | ArrayLike, scale: float = 100, digits: int = 1
) -> str:
    """Table-ready "mean ± std" string, e.g. AUROCs [0.931, 0.935, 0.939] -> "93.5 ± 0.4"."""
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"
