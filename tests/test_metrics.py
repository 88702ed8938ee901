"""Every metric is checked against an independent truth: sklearn called directly, a brute-force loop,
numerical integration, or a hand-worked example whose answer is written out in the comments."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ood_lightning.evaluation.metrics import (
    aupr_in,
    aupr_out,
    auroc,
    autc,
    detection_error,
    format_mean_std,
    fpr_at_tpr,
    mean_std,
    ood_metrics,
    open_set_macro_f1,
    threshold_at_tpr,
    tnr_at_tpr,
)


@pytest.fixture
def overlapping() -> tuple[np.ndarray, np.ndarray]:
    """Partly overlapping Gaussians with unequal sizes (ID higher = more in-distribution)."""
    rng = np.random.default_rng(0)
    return rng.normal(1.0, 1.0, 400), rng.normal(-0.5, 1.3, 250)


@pytest.fixture
def tied() -> tuple[np.ndarray, np.ndarray]:
    """Heavily quantised scores so that many ID/OOD values are exactly equal."""
    rng = np.random.default_rng(1)
    return rng.integers(2, 10, 300).astype(float), rng.integers(0, 7, 200).astype(float)


def _labels(id_s: np.ndarray, ood_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.r_[np.ones(id_s.size), np.zeros(ood_s.size)], np.r_[id_s, ood_s]


# ---------------------------------------------------------------- AUROC / AUPR


def _pairwise_auroc(id_s: np.ndarray, ood_s: np.ndarray) -> float:
    """Mann-Whitney: P(id > ood) + 0.5 P(id == ood), counted over all pairs."""
    diff = id_s[:, None] - ood_s[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def _brute_force_ap(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision by its definition on untied scores: rank everything by score (highest
    first) and average, over the positives, the precision among the top-k where k is the rank of
    that positive."""
    scores = np.r_[pos, neg]
    is_pos = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
    assert np.unique(scores).size == scores.size, "brute-force AP needs untied scores"
    precisions = []
    for p in pos:
        top_k = scores >= p  # everything ranked at or above this positive
        precisions.append(np.sum(is_pos & top_k) / np.sum(top_k))
    return float(np.mean(precisions))


@pytest.mark.parametrize("data", ["overlapping", "tied"])
def test_auroc_matches_pairwise_count(
    data: str, request: pytest.FixtureRequest
) -> None:
    id_s, ood_s = request.getfixturevalue(data)
    # The truth is the pairwise (Mann-Whitney) count, not sklearn (which auroc() calls).
    assert auroc(id_s, ood_s) == pytest.approx(_pairwise_auroc(id_s, ood_s), abs=1e-12)
    # Wiring check only (auroc() wraps roc_auc_score): ID must be the positive class, higher score
    # meaning more in-distribution.
    y, s = _labels(id_s, ood_s)
    assert auroc(id_s, ood_s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc(ood_s, id_s) == pytest.approx(1.0 - auroc(id_s, ood_s), abs=1e-12)
    # Genuinely overlapping, not a trivial 0.5 or 1.0.
    assert 0.6 < auroc(id_s, ood_s) < 0.95


def test_aupr_in_and_out_match_brute_force_average_precision(
    overlapping: tuple[np.ndarray, np.ndarray],
) -> None:
    # Untied continuous scores, so AP has a single unambiguous definition (no tie handling).
    id_s, ood_s = overlapping
    expected_in = _brute_force_ap(id_s, ood_s)  # ID positive, rank by score
    expected_out = _brute_force_ap(-ood_s, -id_s)  # OOD positive, rank by -score
    assert aupr_in(id_s, ood_s) == pytest.approx(expected_in, abs=1e-12)
    assert aupr_out(id_s, ood_s) == pytest.approx(expected_out, abs=1e-12)
    # Both well above their chance levels (the class prevalences) and clearly different.
    assert expected_in > id_s.size / (id_s.size + ood_s.size) + 0.2
    assert expected_out > ood_s.size / (id_s.size + ood_s.size) + 0.2
    assert expected_in != pytest.approx(expected_out, abs=1e-2)


def test_aupr_with_ties_wires_sklearn_in_both_directions(
    tied: tuple[np.ndarray, np.ndarray],
) -> None:
    # Tied scores: AP is defined by sklearn's step-wise rule (all tied items enter together), so
    # this is only a wiring check that ID/OOD and the score sign are passed the right way round.
    id_s, ood_s = tied
    y, s = _labels(id_s, ood_s)
    assert aupr_in(id_s, ood_s) == pytest.approx(
        average_precision_score(y, s), abs=1e-12
    )
    assert aupr_out(id_s, ood_s) == pytest.approx(
        average_precision_score(1 - y, -s), abs=1e-12
    )
    assert aupr_in(id_s, ood_s) != pytest.approx(aupr_out(id_s, ood_s), abs=1e-3)


def test_aupr_hand_example() -> None:
    # Ranking by score: 3 (ID), 2 (OOD), 1 (ID).
    # AUPR-In: precision at each ID hit = 1/1 and 2/3 -> mean 5/6.
    # AUPR-Out ranks by -score: 1 (ID), 2 (OOD), 3 (ID); the OOD hit is at rank 2 -> 1/2.
    assert aupr_in([3.0, 1.0], [2.0]) == pytest.approx(5 / 6)
    assert aupr_out([3.0, 1.0], [2.0]) == pytest.approx(1 / 2)


def test_all_tied_scores_give_chance_level() -> None:
    id_s, ood_s = np.full(30, 0.7), np.full(10, 0.7)
    assert auroc(id_s, ood_s) == pytest.approx(0.5)
    assert aupr_in(id_s, ood_s) == pytest.approx(30 / 40)  # prevalence of ID
    assert aupr_out(id_s, ood_s) == pytest.approx(10 / 40)  # prevalence of OOD
    assert fpr_at_tpr(id_s, ood_s) == 1.0  # every tied OOD is accepted with the ID
    assert detection_error(id_s, ood_s) == pytest.approx(0.5)
    assert autc(id_s, ood_s) == pytest.approx(0.5)


def test_accepts_torch_tensors_including_grad(
    overlapping: tuple[np.ndarray, np.ndarray],
) -> None:
    torch = pytest.importorskip("torch")
    id_s, ood_s = overlapping
    id_t = torch.tensor(id_s, requires_grad=True)
    ood_t = torch.tensor(ood_s, dtype=torch.float64)
    assert ood_metrics(id_t, ood_t) == pytest.approx(ood_metrics(id_s, ood_s))


# ---------------------------------------------------------------- FPR@TPR / thresholds


def test_fpr95_hand_example() -> None:
    id_s = np.arange(1.0, 21.0)  # 20 ID scores 1..20
    ood_s = np.array([0.0, 1.5, 2.0, 2.5, 30.0])
    # Keeping >= 95% of 20 ID means keeping 19 -> threshold is the 19th largest ID score = 2.
    assert threshold_at_tpr(id_s, 0.95) == 2.0
    # OOD with score >= 2: {2.0 (tie counts), 2.5, 30} -> 3 / 5.
    assert fpr_at_tpr(id_s, ood_s, 0.95) == pytest.approx(0.6)
    assert tnr_at_tpr(id_s, ood_s, 0.95) == pytest.approx(0.4)
    # At 90%: keep 18 -> threshold 3 -> only 30 is accepted -> 1 / 5.
    assert threshold_at_tpr(id_s, 0.90) == 3.0
    assert fpr_at_tpr(id_s, ood_s, 0.90) == pytest.approx(0.2)
    # tpr=1 keeps every ID sample: threshold = min ID score = 1 -> {1.5, 2, 2.5, 30} -> 4 / 5.
    assert fpr_at_tpr(id_s, ood_s, 1.0) == pytest.approx(0.8)


def test_threshold_exact_at_round_tpr_despite_float_error() -> None:
    # 0.55 * 100 == 55.00000000000001 in floating point; a naive ceil() would keep 56, not 55.
    assert 0.55 * 100 > 55
    id_s = np.arange(100.0)
    t = threshold_at_tpr(id_s, 0.55)
    assert t == 45.0
    assert np.mean(id_s >= t) == pytest.approx(0.55)
    assert threshold_at_tpr(id_s, 0.95) == 5.0


def test_threshold_with_tied_id_scores() -> None:
    id_s = np.array([5.0, 5.0, 5.0, 5.0, 1.0])
    assert threshold_at_tpr(id_s, 0.8) == 5.0  # four fives are exactly 80%
    assert threshold_at_tpr(id_s, 0.6) == 5.0  # ties keep 80% >= 60%; no larger t works
    assert threshold_at_tpr(id_s, 0.81) == 1.0


@pytest.mark.parametrize("tpr", [0.5, 0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("data", ["overlapping", "tied"])
def test_threshold_is_largest_value_meeting_tpr(
    tpr: float, data: str, request: pytest.FixtureRequest
) -> None:
    id_s, ood_s = request.getfixturevalue(data)
    t = threshold_at_tpr(id_s, tpr)
    # Brute force over candidate thresholds (the distinct ID scores): largest with mean(id >= c) >= tpr.
    best = max(c for c in np.unique(id_s) if np.mean(id_s >= c) >= tpr)
    assert t == best
    assert fpr_at_tpr(id_s, ood_s, tpr) == pytest.approx(np.mean(ood_s >= best))
    assert tnr_at_tpr(id_s, ood_s, tpr) == pytest.approx(1.0 - np.mean(ood_s >= best))


# ---------------------------------------------------------------- detection error


@pytest.mark.parametrize("data", ["overlapping", "tied"])
def test_detection_error_brute_force(data: str, request: pytest.FixtureRequest) -> None:
    id_s, ood_s = request.getfixturevalue(data)
    candidates = np.r_[np.unique(np.r_[id_s, ood_s]), np.inf]
    brute = min(
        0.5 * (1 - np.mean(id_s >= t)) + 0.5 * np.mean(ood_s >= t) for t in candidates
    )
    assert detection_error(id_s, ood_s) == pytest.approx(brute, abs=1e-12)
    assert 0.05 < brute < 0.45


def test_detection_error_extremes() -> None:
    assert detection_error([2.0, 3.0], [0.0, 1.0]) == 0.0
    # Inverted: nothing beats accepting everything (or nothing), both 0.5.
    assert detection_error([0.0, 1.0], [2.0, 3.0]) == 0.5


# ---------------------------------------------------------------- AuTC


def _autc_by_integration(
    id_s: np.ndarray, ood_s: np.ndarray, n_grid: int = 100_001
) -> float:
    lo, hi = min(id_s.min(), ood_s.min()), max(id_s.max(), ood_s.max())
    id_n, ood_n = np.sort((id_s - lo) / (hi - lo)), np.sort((ood_s - lo) / (hi - lo))
    t = np.linspace(0.0, 1.0, n_grid)
    # FPR(t) = mean(ood >= t), FNR(t) = mean(id < t), evaluated by binary search on sorted scores.
    fpr = (ood_n.size - np.searchsorted(ood_n, t, side="left")) / ood_n.size
    fnr = np.searchsorted(id_n, t, side="left") / id_n.size
    return 0.5 * (np.trapezoid(fpr, t) + np.trapezoid(fnr, t))


@pytest.mark.parametrize("data", ["overlapping", "tied"])
def test_autc_matches_numerical_integration(
    data: str, request: pytest.FixtureRequest
) -> None:
    id_s, ood_s = request.getfixturevalue(data)
    numeric = _autc_by_integration(id_s, ood_s)
    assert autc(id_s, ood_s) == pytest.approx(numeric, abs=1e-4)
    assert 0.05 < numeric < 0.45


def test_autc_shift_and_scale_invariant(
    overlapping: tuple[np.ndarray, np.ndarray],
) -> None:
    id_s, ood_s = overlapping
    assert autc(3.0 * id_s - 7.0, 3.0 * ood_s - 7.0) == pytest.approx(
        autc(id_s, ood_s), abs=1e-12
    )


def test_autc_limits() -> None:
    rng = np.random.default_rng(2)
    # Perfect separation with maximal gap: ID all at the max, OOD all at the min.
    assert autc(np.full(50, 10.0), np.full(30, -3.0)) == pytest.approx(0.0, abs=1e-12)
    # Fully inverted.
    assert autc(np.full(50, -3.0), np.full(30, 10.0)) == pytest.approx(1.0, abs=1e-12)
    # Identical samples: exactly 0.5.
    same = rng.normal(size=200)
    assert autc(same, same.copy()) == pytest.approx(0.5, abs=1e-12)
    # Two large samples from one distribution: close to 0.5.
    assert autc(rng.normal(size=20_000), rng.normal(size=20_000)) == pytest.approx(
        0.5, abs=0.02
    )
    # Constant scores carry no information.
    assert autc(np.ones(5), np.ones(3)) == 0.5


def test_autc_rewards_gap_that_auroc_ignores() -> None:
    # Both are perfectly separated (AUROC = 1), but the second leaves a wide margin between classes.
    # Normalised: narrow -> ID {0.55, 1}, OOD {0, 0.45}: 0.5*(0.225 + 0.225) = 0.225.
    #             wide   -> ID {0.9, 1},  OOD {0, 0.1}:  0.5*(0.05 + 0.05)  = 0.05.
    narrow_id, narrow_ood = np.array([5.5, 10.0]), np.array([0.0, 4.5])
    wide_id, wide_ood = np.array([9.0, 10.0]), np.array([0.0, 1.0])
    assert auroc(narrow_id, narrow_ood) == auroc(wide_id, wide_ood) == 1.0
    assert autc(narrow_id, narrow_ood) == pytest.approx(0.225)
    assert autc(wide_id, wide_ood) == pytest.approx(0.05)


# ---------------------------------------------------------------- open-set macro-F1


def _open_set_example() -> dict[str, np.ndarray]:
    return {
        "id_preds": np.array([0, 1, 1, 1]),
        "id_labels": np.array([0, 0, 1, 1]),
        "id_scores": np.array([0.9, 0.8, 0.2, 0.7]),
        "ood_preds": np.array([0, 1, 1]),
        "ood_scores": np.array([0.6, 0.1, 0.3]),
    }


def test_open_set_macro_f1_hand_example() -> None:
    # threshold 0.5, C = 2 (unknown = 2):
    #   y_true = [0, 0, 1, 1, 2, 2, 2]
    #   y_pred = [0, 1, 2, 1, 0, 2, 2]   (ID #3 rejected; OOD #1 accepted as class 0)
    # F1 = 2TP / (2TP + FP + FN): class0 2/4, class1 2/4, unknown 4/6 -> macro 5/9.
    ex = _open_set_example()
    assert open_set_macro_f1(**ex, threshold=0.5, num_classes=2) == pytest.approx(5 / 9)


def test_open_set_macro_f1_logits_and_tie_at_threshold() -> None:
    ex = _open_set_example()
    eye = np.eye(2)
    # Logits whose argmax is the old prediction.
    ex["id_preds"] = eye[ex["id_preds"]] * 3.0 - 1.0
    ex["ood_preds"] = eye[ex["ood_preds"]] * 2.0
    assert open_set_macro_f1(**ex, threshold=0.5, num_classes=2) == pytest.approx(5 / 9)
    # Threshold exactly at OOD #0's score: still accepted (>=), so the answer is unchanged.
    assert open_set_macro_f1(**ex, threshold=0.6, num_classes=2) == pytest.approx(5 / 9)
    # Threshold exactly at ID #3's score (0.7): still accepted; OOD #0 (0.6) is now rejected.
    #   y_pred = [0, 1, 2, 1, 2, 2, 2]: class0 2/3, class1 2/4, unknown 6/7.
    expected = (2 / 3 + 1 / 2 + 6 / 7) / 3
    assert open_set_macro_f1(**ex, threshold=0.7, num_classes=2) == pytest.approx(
        expected
    )
    # Just above it, ID #3 is rejected too: y_pred = [0, 1, 2, 2, 2, 2, 2].
    #   class0 2/3, class1 0 (TP 0), unknown 2*3 / (2*3 + 2) = 6/8.
    expected = (2 / 3 + 0.0 + 6 / 8) / 3
    assert open_set_macro_f1(**ex, threshold=0.71, num_classes=2) == pytest.approx(
        expected
    )


def test_open_set_macro_f1_skips_classes_absent_everywhere() -> None:
    # Same data with C = 3: class 2 never occurs in truth or predictions, unknown is now 3.
    ex = _open_set_example()
    assert open_set_macro_f1(**ex, threshold=0.5, num_classes=3) == pytest.approx(5 / 9)


def test_open_set_macro_f1_validates_inputs() -> None:
    ex = _open_set_example()
    with pytest.raises(ValueError, match="ID lengths differ"):
        open_set_macro_f1(
            **{**ex, "id_labels": np.array([0, 1])}, threshold=0.5, num_classes=2
        )
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        open_set_macro_f1(
            **{**ex, "id_labels": np.array([0, 0, 2, 1])}, threshold=0.5, num_classes=2
        )


# ---------------------------------------------------------------- ood_metrics / validation


def test_ood_metrics_keys_and_consistency(
    overlapping: tuple[np.ndarray, np.ndarray],
) -> None:
    id_s, ood_s = overlapping
    m = ood_metrics(id_s, ood_s)
    assert list(m) == [
        "auroc",
        "aupr_in",
        "aupr_out",
        "fpr95",
        "tnr95",
        "detection_error",
        "autc",
    ]
    assert all(isinstance(v, float) for v in m.values())
    # Every value against a brute-force truth that does not go through the library.
    assert m["auroc"] == pytest.approx(_pairwise_auroc(id_s, ood_s), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(_brute_force_ap(id_s, ood_s), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(_brute_force_ap(-ood_s, -id_s), abs=1e-12)
    # FPR@95 by direct counting: the largest candidate threshold keeping >= 95% of ID.
    t95 = max(c for c in id_s if np.sum(id_s >= c) >= 0.95 * id_s.size)
    assert np.sum(id_s >= t95) == 380  # 95% of 400, exactly
    assert m["fpr95"] == pytest.approx(np.sum(ood_s >= t95) / ood_s.size, abs=1e-12)
    assert m["tnr95"] == pytest.approx(np.sum(ood_s < t95) / ood_s.size, abs=1e-12)
    candidates = np.r_[np.unique(np.r_[id_s, ood_s]), np.inf]
    brute_de = min(
        0.5 * (1 - np.mean(id_s >= t)) + 0.5 * np.mean(ood_s >= t) for t in candidates
    )
    assert m["detection_error"] == pytest.approx(brute_de, abs=1e-12)
    assert m["autc"] == pytest.approx(_autc_by_integration(id_s, ood_s), abs=1e-4)
    assert 0.0 < m["fpr95"] < 1.0 and 0.0 < m["detection_error"] < 0.5


@pytest.mark.parametrize("which", ["ID", "OOD"])
def test_empty_scores_raise(which: str) -> None:
    good, empty = np.array([0.1, 0.2]), np.array([])
    args = (empty, good) if which == "ID" else (good, empty)
    with pytest.raises(ValueError, match=f"{which} scores are empty"):
        ood_metrics(*args)


@pytest.mark.parametrize(
    "bad,word", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")]
)
@pytest.mark.parametrize("which", ["ID", "OOD"])
def test_non_finite_scores_raise(bad: float, word: str, which: str) -> None:
    good, broken = np.array([0.1, 0.2, 0.3]), np.array([0.1, bad, 0.3])
    args = (broken, good) if which == "ID" else (good, broken)
    with pytest.raises(
        ValueError,
        match=f"{which} scores contain {word}: the detector produced non-finite",
    ):
        ood_metrics(*args)
    with pytest.raises(ValueError, match=f"{which} scores contain {word}"):
        fpr_at_tpr(*args)


def test_bad_shapes_and_tpr_raise() -> None:
    with pytest.raises(ValueError, match="1-D"):
        auroc(np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="tpr must be in"):
        threshold_at_tpr([1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match="tpr must be in"):
        fpr_at_tpr([1.0, 2.0], [0.0], 1.5)


# ---------------------------------------------------------------- aggregation across seeds


def test_mean_std() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))  # sample std, ddof=1
    assert mean_std([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])


def test_format_mean_std() -> None:
    assert format_mean_std([0.931, 0.935, 0.939]) == "93.5 ± 0.4"
    assert format_mean_std([1.0, 2.0, 3.0], scale=1, digits=2) == "2.00 ± 1.00"
    assert format_mean_std([0.5]) == "50.0 ± 0.0"
