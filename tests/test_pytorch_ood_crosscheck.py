"""Our detectors and metrics against pytorch-ood 0.4.0, sample by sample, on one tiny trained model.

pytorch-ood's scores are "higher = OOD": every comparison flips their sign. Where the two
libraries legitimately differ (a normalisation, a regulariser, a mean instead of a sum),
the test asserts the documented relation and says why beside it. Install with
``pip install -e .[test]`` (pytorch-ood is a test-only dependency).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score
from torch import Tensor, nn

pood = pytest.importorskip("pytorch_ood", reason="pytorch-ood is a test-only extra: pip install -e '.[test]'")
from pytorch_ood import detector as P  # noqa: E402
from pytorch_ood.metrics import OODMetrics  # noqa: E402

from ood_lightning.detectors import (  # noqa: E402
    ASH,
    DICE,
    FDBD,
    GEN,
    KNN,
    MSP,
    ODIN,
    RMDS,
    SCALE,
    SHE,
    Energy,
    Entropy,
    GradNorm,
    KLMatching,
    Mahalanobis,
    MaxLogit,
    NNGuide,
    ReAct,
    TemperatureScaling,
    ViM,
)
from ood_lightning.evaluation import metrics as M  # noqa: E402
from ood_lightning.scoring.api import FitData, Outputs  # noqa: E402

STD = (0.5, 0.25)  # the per-channel std ODIN's step is divided by


class TinyNet(nn.Module):
    """A FeatureModel on [B, 2, 3, 3] "images": two ReLU layers, then a linear head named ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(18, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        h1 = F.relu(self.fc1(x.flatten(1)))
        return {"block1": h1, "penultimate": F.relu(self.fc2(h1))}

    def features(self, x: Tensor) -> Tensor:
        return self.forward_features(x)["penultimate"]

    def classify(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.features(x))


def blobs(n: int, gen: torch.Generator, shift: float = 0.0, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    centres = 0.6 * torch.randn(4, 18, generator=torch.Generator().manual_seed(123))
    y = torch.arange(n) % 4
    x = centres[y] + shift + scale * torch.randn(n, 18, generator=gen)
    return x.view(n, 2, 3, 3), y


@pytest.fixture(scope="module")
def setup():
    return tiny_trained_setup()


def tiny_trained_setup() -> dict:
    """A 4-class classifier trained on Gaussian blobs; fixed ID/OOD test inputs and their outputs."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x_train, y_train = blobs(600, gen)
    x_val, y_val = blobs(200, gen)
    x_id, _ = blobs(200, gen)
    x_ood = torch.cat([blobs(100, gen, shift=1.0)[0], 1.5 * torch.randn(100, 2, 3, 3, generator=gen)])
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        opt.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        opt.step()
    model.eval()

    def outputs(x: Tensor, y: Tensor | None = None) -> Outputs:
        with torch.no_grad():
            feats = model.forward_features(x)
            return Outputs(logits=model.classify(feats["penultimate"]), features=feats["penultimate"],
                           layers=dict(feats), labels=y)

    train = outputs(x_train, y_train)
    assert (train.logits.argmax(-1) == y_train).float().mean() > 0.9  # a trained classifier
    x_test = torch.cat([x_id, x_ood])
    return {"model": model, "train": train, "val": outputs(x_val, y_val), "test": outputs(x_test), "x_test": x_test,
            "y_train": y_train}


def ours(det, model, train: Outputs | None, test: Outputs, val: Outputs | None = None) -> Tensor:
    """Fit (where the scorer needs it) and score, as the evaluation loop does."""
    if det.needs_fit:
        det.fit(model, FitData(train=train, val=val))
    return det.score(model, test).double()


def ours_inputs(det, model, x: Tensor) -> Tensor:
    return det.score_batch(model, x).double()


def agree(a: Tensor, b: Tensor, tol: float = 1e-5) -> None:
    """Same ranking (Spearman >= 0.9999) and, the scales matching, max|diff| <= tol * max(1, max|score|)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert spearmanr(a.numpy(), b.numpy()).statistic >= 0.9999
    assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), float((a - b).abs().max())


def theirs(t: Tensor) -> Tensor:
    """pytorch-ood's outlier score, flipped to our "higher = ID"."""
    return -t.detach().double()


# ----------------------------------------------------------------------------- logit detectors


def test_logit_scores_agree(setup) -> None:
    test = setup["test"]
    agree(ours(MSP(), None, None, test), theirs(P.MaxSoftmax.score(test.logits)))
    agree(ours(Energy(), None, None, test), theirs(P.EnergyBased.score(test.logits)))
    agree(ours(MaxLogit(), None, None, test), theirs(P.MaxLogit.score(test.logits)))
    # pytorch-ood clips p at 1e-7 before the log: a difference below 1e-6 per class on these logits
    agree(ours(Entropy(), None, None, test), theirs(P.Entropy.score(test.logits)))


def test_gen_is_c_times_pytorch_oods_mean(setup) -> None:
    test = setup["test"]
    c = test.logits.shape[1]
    p = test.logits.softmax(-1)
    unclamped = ((p > 1e-7) & (p < 1 - 1e-7)).all(-1)  # pytorch-ood clamps p to [1e-7, 1 - 1e-7]; the paper does not
    assert unclamped.float().mean() > 0.8
    # the paper (and its code) sums the top-M terms, pytorch-ood averages them: ours = C x theirs with M = C
    got = ours(GEN(gamma=0.1, top_m=100), None, None, test)[unclamped]
    agree(got, c * theirs(P.GEN.score(test.logits, gamma=0.1))[unclamped])


def test_kl_matching_agrees(setup) -> None:
    train, test = setup["train"], setup["test"]
    ref = P.KLMatching(model=None).fit_logits(train.logits, train.labels)
    agree(ours(KLMatching(), None, train, test), theirs(ref.predict_logits(test.logits)))


def test_temperature_scaling_fits_at_least_as_well_and_scores_alike(setup) -> None:
    val, test = setup["val"], setup["test"]
    ref = P.TemperatureScaling(model=None).fit_logits(val.logits, val.labels)
    det = TemperatureScaling()
    got = ours(det, None, None, test, val=val)
    t_ref = float(ref.t.detach())

    def nll(t: float) -> float:
        return float(F.cross_entropy(val.logits.double() / t, val.labels))

    # pytorch-ood stops L-BFGS (lr 0.01) after 50 steps, so its T is only part of the way from its start
    # T = 1 towards the optimum ("only approximately reached", its docstring); ours converges (the unit
    # test checks it against a grid). So: our NLL is no worse, its T lies between 1 and ours, and with
    # its T our formula reproduces its scores.
    assert nll(det.temperature) <= nll(t_ref) + 1e-9
    assert min(1.0, det.temperature) - 1e-6 <= t_ref <= max(1.0, det.temperature) + 1e-6
    agree((test.logits.double() / t_ref).softmax(-1).amax(-1), theirs(ref.predict_logits(test.logits)))
    assert got.shape == (len(test),)


# ----------------------------------------------------------------------------- input / gradient detectors


def test_odin_with_the_std_agrees(setup) -> None:
    model, x = setup["model"], setup["x_test"]
    ref = P.ODIN(model, eps=0.0014, temperature=1000.0, norm_std=list(STD))
    agree(ours_inputs(ODIN(1000.0, 0.0014, input_std=STD), model, x), theirs(ref.predict(x)))


def test_gradnorm_closed_form_agrees_with_per_sample_gradients(setup) -> None:
    model, x, test = setup["model"], setup["x_test"], setup["test"]
    ref = P.GradNorm(model, param_filter=lambda name: name == "head.weight")  # the paper: last layer's weight
    agree(ours(GradNorm(), model, None, test), theirs(ref.predict(x)), tol=1e-4)  # float32 autograd vs closed form


# ----------------------------------------------------------------------------- feature detectors


def head_of(model: TinyNet):
    return lambda maps: model.head(maps.flatten(1))  # pytorch-ood's feature-map detectors take [B, D, 1, 1]


def test_react_agrees(setup) -> None:
    model, train, test = setup["model"], setup["train"], setup["test"]
    ref = P.ReAct(backbone=None, head=head_of(model), percentile=0.9)
    ref.fit_feature_maps(train.features[:, :, None, None], train.labels)
    det = ReAct(percentile=90.0)
    got = ours(det, model, train, test)
    assert det.threshold == pytest.approx(ref.threshold, rel=1e-6)  # both numpy's percentile, ours exact
    agree(got, theirs(ref.predict_feature_maps(test.features[:, :, None, None])))


@pytest.mark.parametrize("variant", ["p", "b", "s"])
def test_ash_agrees(setup, variant: str) -> None:
    model, test = setup["model"], setup["test"]
    ref = P.ASH(backbone=None, head=head_of(model), variant=f"ash-{variant}", percentile=0.65)
    agree(ours(ASH(variant, 65.0), model, None, test),
          theirs(ref.predict_feature_maps(test.features[:, :, None, None].clone())))


def test_scale_agrees(setup) -> None:
    model, test = setup["model"], setup["test"]
    ref = P.SCALE(backbone=None, head=head_of(model), percentile=0.85)
    agree(ours(SCALE(85.0), model, None, test), theirs(ref.predict_feature_maps(test.features[:, :, None, None])))


def test_dice_agrees(setup) -> None:
    model, train, test = setup["model"], setup["train"], setup["test"]
    ref = P.DICE(encoder=None, w=model.head.weight, b=model.head.bias, p=0.7).fit_features(train.features, train.labels)
    agree(ours(DICE(sparsity=0.7), model, train, test), theirs(ref.predict_features(test.features)))


def test_knn_agrees(setup) -> None:
    train, test = setup["train"], setup["test"]
    ref = P.KNN(encoder=None, k=50).fit_features(train.features, train.labels)
    agree(ours(KNN(k=50), None, train, test), theirs(ref.predict_features(test.features)))


def test_vim_agrees(setup) -> None:
    model, train, test = setup["model"], setup["train"], setup["test"]
    ref = P.ViM(encoder=None, d=8, w=model.head.weight, b=model.head.bias).fit_features(train.features, train.labels)
    det = ViM(dim=8)
    got = ours(det, model, train, test)
    assert det.alpha == pytest.approx(ref.alpha, rel=1e-4)  # float32 eigh in pytorch-ood, float64 here
    agree(got, theirs(ref.predict_features(test.features)), tol=1e-4)


def test_she_agrees(setup) -> None:
    model, train, test = setup["model"], setup["train"], setup["test"]
    ref = P.SHE(encoder=None, head=model.head).fit_features(train.features, train.labels)
    agree(ours(SHE(), model, train, test), theirs(ref.predict_features(test.features)))


def test_fdbd_agrees(setup) -> None:
    model, train, test = setup["model"], setup["train"], setup["test"]
    ref = P.fDBD(encoder=None, head=model.head).fit_features(train.features)
    agree(ours(FDBD(), model, train, test), theirs(ref.predict_features(test.features)))


def test_nnguide_agrees(setup) -> None:
    model, train, test = setup["model"], setup["train"], setup["test"]
    ref = P.NNGuide(encoder=None, head=model.head, k=10).fit_features(train.features, train.labels)
    agree(ours(NNGuide(k=10), model, train, test), theirs(ref.predict_features(test.features)))


def live_units(train: Outputs) -> Tensor:
    """Units that vary on the fit data: pytorch-ood inverts cov + 1e-6·I, which makes a dead unit dominate."""
    return train.features.std(0) > 0


def restrict(out: Outputs, keep: Tensor) -> Outputs:
    f = out.features[:, keep]
    return Outputs(logits=out.logits, features=f, layers={"penultimate": f}, labels=out.labels)


@contextmanager
def float64_default() -> Iterator[None]:
    """pytorch-ood builds its means, covariances and ridge with the default dtype: float64 here.

    In float32 its inverse of the unnormalised scatter (cond ~ 2000 on this setup) carries errors
    of 3e-3 to 3e-2 on RMD's difference of two distances, depending on which MKL kernels the CPU
    gets (MKL_CBWR=COMPATIBLE gives the larger); in float64 both libraries agree to 3e-7.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def test_mahalanobis_is_minus_2n_times_pytorch_oods(setup) -> None:
    keep = live_units(setup["train"])
    train, test = restrict(setup["train"], keep), restrict(setup["test"], keep)
    with float64_default():
        f_train, f_test = train.features.double(), test.features.double()
        ref = P.Mahalanobis(encoder=None).fit_features(f_train, train.labels)
        reference = ref.predict_features(f_test)
    # pytorch-ood: half the squared distance under the *unnormalised* within-class scatter S = N·Σ
    # (+ 1e-6·I); ours (the reference code's): the full squared distance under Σ = S / N. Hence
    # ours = 2N × (−theirs), up to the 1e-6 ridge (5e-8 relative here).
    n = len(train.features)
    agree(ours(Mahalanobis(), None, train, test), 2 * n * theirs(reference), tol=1e-6)


def test_rmds_is_minus_n_times_pytorch_oods(setup) -> None:
    keep = live_units(setup["train"])
    train, test = restrict(setup["train"], keep), restrict(setup["test"], keep)
    with float64_default():
        f_train, f_test = train.features.double(), test.features.double()
        ref = P.RMD(encoder=None).fit_features(f_train, train.labels)
        reference = ref.predict_features(f_test)
    # both covariances unnormalised in pytorch-ood (sums, + 1e-6·I), both divided by N here (the MLE,
    # as Ren et al.'s and OpenOOD's sklearn EmpiricalCovariance): ours = N × (−theirs), up to the
    # ridge (3e-8 relative here). Ren et al.'s formula itself, brute force in float64, is checked in
    # test_detectors_new.py::test_rmds_is_class_minus_background_mahalanobis.
    n = len(train.features)
    agree(ours(RMDS(), None, train, test), n * theirs(reference), tol=1e-6)


# ----------------------------------------------------------------------------- metrics


def metric_cases():
    rng = np.random.default_rng(0)
    yield "continuous", rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 200)
    # heavy ties: the ID 95% threshold is 0.5 (290 of 300 ID >= 0.5, 140 > 0.5), and half the ID and
    # over 70% of the OOD scores sit exactly on it
    id_s = np.r_[np.zeros(10), np.full(150, 0.5), rng.integers(3, 5, 140) / 4.0]
    ood_s = np.r_[np.full(140, 0.5), rng.integers(0, 3, 60) / 4.0]
    yield "ties", id_s, ood_s


@pytest.mark.parametrize("name, id_s, ood_s", list(metric_cases()))
def test_metrics_agree_with_pytorch_ood_roles_swapped_and_sklearn(name: str, id_s, ood_s) -> None:
    # pytorch-ood's positive class is OOD (label < 0) with higher = more OOD. Swapping roles (our ID
    # labelled -1, our score as its "outlier score") makes its positive class our ID, as in our metrics.
    scores = torch.tensor(np.r_[id_s, ood_s])
    labels = torch.tensor(np.r_[-np.ones(len(id_s)), np.zeros(len(ood_s))]).long()
    ref = OODMetrics().update(scores, labels).compute()
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    s = np.r_[id_s, ood_s]
    assert M.auroc(id_s, ood_s) == pytest.approx(ref["AUROC"], abs=1e-12)
    assert M.auroc(id_s, ood_s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.fpr_at_tpr(id_s, ood_s, 0.95) == pytest.approx(ref["FPR95TPR"], abs=1e-12)
    t = max(v for v in np.unique(id_s) if np.mean(id_s >= v) >= 0.95)  # by counting
    if name == "ties":
        assert t == 0.5 and np.sum(ood_s == t) >= 140  # the case exercises ties at the threshold
    assert M.fpr_at_tpr(id_s, ood_s, 0.95) == pytest.approx(np.mean(ood_s >= t), abs=1e-12)
    # AUPR: ours is sklearn's average precision (a step sum); pytorch-ood integrates the same
    # precision-recall curve with the trapezoidal rule (sklearn.metrics.auc). Same curve, two quadratures.
    assert M.aupr_in(id_s, ood_s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.aupr_out(id_s, ood_s) == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    prec, rec, _ = precision_recall_curve(y, s)
    assert ref["AUPR-OUT"] == pytest.approx(auc(rec, prec), abs=1e-12)  # its positive class = our ID
    prec, rec, _ = precision_recall_curve(1 - y, -s)
    assert ref["AUPR-IN"] == pytest.approx(auc(rec, prec), abs=1e-12)  # its ID = our OOD
    if name == "continuous":  # without ties the two quadratures nearly coincide
        assert M.aupr_in(id_s, ood_s) == pytest.approx(ref["AUPR-OUT"], abs=5e-3)
