"""The post-hoc baselines of issue 17, each against its paper's formula on a hand-computable case.

Every expected value below is written out from the paper's equation (closed form or a
numpy re-derivation), chosen so that the plausible wrong implementations (sign flip,
k off by one, squared vs plain distance, mean vs sum, wrong centre, wrong layer) fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.detectors import (
    ASH,
    DICE,
    FDBD,
    GEN,
    KNN,
    ODIN,
    RMDS,
    SCALE,
    SHE,
    Entropy,
    GradNorm,
    KLMatching,
    Mahalanobis,
    MaxLogit,
    NNGuide,
    TemperatureScaling,
    ViM,
)
from ood_lightning.detectors.knn import kth_neighbour_distance
from ood_lightning.detectors.temperature_scaling import fit_inverse_temperature
from ood_lightning.errors import ConfigError
from ood_lightning.scoring.api import FitData, Outputs, Scorer


def fit(det: Scorer, model, train: Outputs, val: Outputs | None = None):
    return det.fit(model, FitData(train=train, val=val))


def score(det: Scorer, model, out: Outputs) -> Tensor:
    return det.score(model, out)


class Linear(nn.Module):
    """A FeatureModel whose penultimate features are its inputs and whose head is W f + b."""

    def __init__(self, weight, bias=None) -> None:
        super().__init__()
        w = torch.as_tensor(weight, dtype=torch.float64)
        self.head = nn.Linear(w.shape[1], w.shape[0]).double()
        with torch.no_grad():
            self.head.weight.copy_(w)
            self.head.bias.copy_(torch.zeros(w.shape[0]) if bias is None else torch.as_tensor(bias))

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        return {"penultimate": x.flatten(1)}

    def classify(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.forward_features(x)["penultimate"])


def outs(model: nn.Module, features, labels=None) -> Outputs:
    f = torch.as_tensor(np.asarray(features, dtype=np.float64)) if not isinstance(features, Tensor) else features.double()
    with torch.no_grad():
        logits = model.classify(f)
    return Outputs(logits=logits, features=f, layers={"penultimate": f},
                   labels=None if labels is None else torch.as_tensor(labels))


def logit_outs(logits) -> Outputs:
    lg = torch.as_tensor(logits, dtype=torch.float64)
    return Outputs(logits=lg, features=torch.zeros(len(lg), 1, dtype=torch.float64))


def lse(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(x.max() + np.log(np.exp(x - x.max()).sum()))


pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- logit scores


def test_maxlogit_is_the_largest_logit_not_its_softmax() -> None:
    got = MaxLogit().score(None, logit_outs([[1.0, 3.0, 2.0], [0.0, -1.0, -2.0]]))
    np.testing.assert_allclose(got.numpy(), [3.0, 0.0])


def test_entropy_is_minus_shannon_entropy_of_the_softmax() -> None:
    got = Entropy().score(None, logit_outs([[0.0, 0.0], [math.log(3.0), 0.0], [30.0, -30.0]]))
    expected = [-math.log(2), 0.75 * math.log(0.75) + 0.25 * math.log(0.25), 0.0]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)  # confident (ID-like) = highest


def test_gen_sums_the_top_m_generalised_entropies() -> None:
    p = np.array([0.5, 0.3, 0.2])
    out = logit_outs(np.log(p)[None])
    term = (p**0.5) * (1 - p) ** 0.5
    assert GEN(gamma=0.5).score(None, out).item() == pytest.approx(-term.sum(), abs=1e-12)  # a sum, not a mean
    assert GEN(gamma=0.5, top_m=2).score(None, out).item() == pytest.approx(-(term[0] + term[1]), abs=1e-12)
    assert GEN(gamma=0.1, top_m=100).score(None, out).item() == pytest.approx(
        -((p**0.1) * (1 - p) ** 0.1).sum(), abs=1e-12)  # M is capped at C


def test_kl_matching_templates_come_from_predictions_not_labels() -> None:
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    train = logit_outs(np.log(probs))
    train.labels = torch.tensor([1, 1, 0])  # deliberately wrong labels: they must not matter
    det = KLMatching().fit(None, FitData(train=train))
    d0, d1 = np.array([0.8, 0.2]), np.array([0.2, 0.8])
    q = np.array([0.6, 0.4])

    def kl(a, b):
        return float((a * np.log(a / b)).sum())

    got = det.score(None, logit_outs(np.log(q)[None])).item()
    assert got == pytest.approx(-min(kl(q, d0), kl(q, d1)), abs=1e-12)
    assert det.fitted_on == "train"
    val = logit_outs(np.log(np.array([[0.6, 0.4]])))
    assert KLMatching().fit(None, FitData(train=train, val=val)).score(None, val).item() == pytest.approx(0, abs=1e-12)


def test_temperature_scaling_finds_the_closed_form_nll_optimum() -> None:
    # all logits [s, 0]; a fraction q labelled 0: NLL is minimal where sigmoid(s/T) = q
    s, q, n = 2.0, 0.8, 50
    logits = torch.tensor([[s, 0.0]] * n, dtype=torch.float64)
    labels = torch.tensor([0] * int(q * n) + [1] * (n - int(q * n)))
    val = Outputs(logits=logits, features=torch.zeros(n, 1), labels=labels)
    det = TemperatureScaling().fit(None, FitData(train=None, val=val))
    t = s / math.log(q / (1 - q))
    assert det.temperature == pytest.approx(t, rel=1e-10)
    assert det.fitted_on == "val"
    x = logit_outs([[3.0, 1.0, -1.0]])
    expected = np.exp(np.array([3.0, 1.0, -1.0]) / t)
    assert det.score(None, x).item() == pytest.approx(expected.max() / expected.sum(), rel=1e-10)


def test_temperature_fit_is_at_least_as_good_as_a_grid_search() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(300, 5, generator=gen, dtype=torch.float64)
    labels = torch.where(torch.rand(300, generator=gen) < 0.6, logits.argmax(-1), torch.randint(5, (300,), generator=gen))
    beta = fit_inverse_temperature(logits, labels)

    def nll(b):
        return float(F.cross_entropy(b * logits, labels))

    grid = np.linspace(0.01, 3.0, 3000)
    assert nll(beta) <= min(nll(b) for b in grid) + 1e-12


# ----------------------------------------------------------------------------- KNN


def test_knn_is_minus_the_kth_distance_on_the_unit_sphere() -> None:
    model = Linear(np.eye(2))
    bank = [[1.0, 0.0], [0.0, 3.0], [-0.5, 0.0]]  # normalised: angles 0, 90, 180 degrees
    query = [[5.0, 0.0]]  # normalised: angle 0 -> distances 0, sqrt(2), 2
    for k, dist in ((1, 0.0), (2, math.sqrt(2.0)), (3, 2.0)):
        det = fit(KNN(k=k), model, outs(model, bank))
        assert score(det, model, outs(model, query)).item() == pytest.approx(-dist, abs=1e-7)


def test_knn_chunked_search_equals_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(37, 6, generator=gen, dtype=torch.float64), dim=-1)
    bank = F.normalize(torch.randn(101, 6, generator=gen, dtype=torch.float64), dim=-1)
    brute = torch.cdist(q, bank).sort(dim=1).values[:, 6]
    got = kth_neighbour_distance(q, bank, 7, query_chunk=5, bank_chunk=9)
    torch.testing.assert_close(got, brute, rtol=0, atol=1e-7)


def test_knn_refuses_fewer_fit_samples_than_k() -> None:
    model = Linear(np.eye(2))
    with pytest.raises(ConfigError, match=r"detectors\.knn\.k.*at least 5 fit samples, got 3"):
        fit(KNN(k=5), model, outs(model, np.ones((3, 2))))


# ----------------------------------------------------------------------------- ViM


def test_vim_residual_and_alpha_on_a_hand_case() -> None:
    w = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
    u = np.array([1.0, -1.0, 2.0])  # the head's "origin": W u = -b
    model = Linear(w, -w @ u)
    offsets = np.array([[3, 0, 0], [-3, 0, 0], [0, 2, 0], [0, -2, 0], [0, 0, 1], [0, 0, -1]], dtype=float)
    # covariance of f - u = diag(3, 4/3, 1/3): the top-2 principal subspace is x-y, the residual z;
    # max logits of the offsets are 3, 0, 2, 0, 1, 0 (mean 1); mean |z| = 1/3, so alpha = 3
    det = fit(ViM(dim=2), model, outs(model, u + offsets))
    assert det.alpha == pytest.approx(3.0, rel=1e-12)
    query = u + np.array([1.0, 1.0, 0.5])
    expected = lse(w @ np.array([1.0, 1.0, 0.5])) - 3.0 * 0.5
    assert score(det, model, outs(model, [query])).item() == pytest.approx(expected, abs=1e-10)


def test_vim_refuses_a_principal_dimension_the_features_do_not_have() -> None:
    model = Linear(np.eye(3))
    with pytest.raises(ConfigError, match=r"detectors\.vim\.dim must be in \[1, 2\]"):
        fit(ViM(dim=3), model, outs(model, np.random.default_rng(0).normal(size=(20, 3))))
    with pytest.raises(ConfigError, match=r"detectors\.vim\.dim.*at least 3 fit samples, got 2"):
        fit(ViM(dim=2), model, outs(model, np.ones((2, 3))))


# ----------------------------------------------------------------------------- GradNorm


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradnorm_closed_form_equals_the_per_sample_backward_pass(temperature: float) -> None:
    gen = torch.Generator().manual_seed(2)
    w, b = torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    model = Linear(w, b)
    f = torch.relu(torch.randn(6, 5, generator=gen, dtype=torch.float64))
    expected = []
    for fi in f:  # the paper: one backward pass per sample, gradient of KL(u || softmax) w.r.t. the weight only
        model.zero_grad()
        loss = -(model.classify(fi[None]) / temperature).log_softmax(-1).mean()
        loss.backward()
        expected.append(model.head.weight.grad.abs().sum().item())
    got = GradNorm(temperature).score(model, outs(model, f))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_detectors_that_read_the_head_refuse_a_classify_that_is_not_the_head() -> None:
    class Latent(Linear):  # as VMDLS: classify applies the head to a transform of the features
        def classify(self, features: Tensor) -> Tensor:
            return self.head(2 * features)

    model = Latent(np.eye(2))
    train = outs(model, np.random.default_rng(0).normal(size=(10, 2)))
    for det in (ViM(dim=1), DICE(), FDBD()):
        with pytest.raises(ConfigError, match="model.classify"):
            fit(det, model, train)
    with pytest.raises(ConfigError, match="model.classify"):
        GradNorm().score(model, train)

    class NoHead(nn.Module):
        head = None

        def classify(self, features: Tensor) -> Tensor:
            return features

    with pytest.raises(ConfigError, match=r"detectors\.dice reads the weights.*NoneType"):
        DICE().fit(NoHead(), FitData(train=train))
    # the declared capability the evaluation checks to skip these scorers for such methods
    assert all(cls.needs_linear_head for cls in (ViM, DICE, FDBD, GradNorm))
    assert not any(cls.needs_linear_head for cls in (KNN, ASH, SCALE, SHE, RMDS, NNGuide, MaxLogit))
    from ood_lightning.methods import Classifier, GeneralizedODIN
    from ood_lightning.methods.vmdls import VMDLS

    assert Classifier.has_linear_head and not GeneralizedODIN.has_linear_head and not VMDLS.has_linear_head


# ----------------------------------------------------------------------------- DICE


def test_dice_masks_the_weights_with_the_smallest_expected_contribution() -> None:
    w = np.array([[1.0, -1.0, 0.5], [2.0, 0.1, -1.0]])
    b = np.array([0.1, -0.2])
    model = Linear(w, b)
    train = [[0.0, 1.0, 2.0], [2.0, 3.0, 4.0]]  # mean (1, 2, 3)
    # contributions W * mean = [[1, -2, 1.5], [2, 0.2, -3]]; their median (p = 0.5, linear) is 0.6
    det = fit(DICE(sparsity=0.5), model, outs(model, train))
    kept = np.array([[1.0, 0.0, 0.5], [2.0, 0.0, 0.0]])
    np.testing.assert_allclose(det.masked_weight.numpy(), kept)
    f = np.array([1.0, 1.0, 1.0])
    assert score(det, model, outs(model, [f])).item() == pytest.approx(lse(kept @ f + b), abs=1e-12)


# ----------------------------------------------------------------------------- ASH / SCALE


def test_ash_variants_on_a_hand_case() -> None:
    f = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0]], dtype=torch.float64)  # D = 5; p = 60 keeps k = 2: 4 and 3
    np.testing.assert_allclose(ASH("p", 60).shape(f).numpy(), [[4, 0, 3, 0, 0]])
    np.testing.assert_allclose(ASH("b", 60).shape(f).numpy(), [[5, 0, 5, 0, 0]])  # s1 / k = 10 / 2
    np.testing.assert_allclose(ASH("s", 60).shape(f).numpy(), [[4 * math.exp(10 / 7), 0, 3 * math.exp(10 / 7), 0, 0]])
    # k = D - round(D p / 100) with numpy's (half-to-even) rounding: p = 50 rounds 2.5 to 2, keeping 3
    np.testing.assert_allclose(ASH("p", 50).shape(f).numpy(), [[4, 0, 3, 2, 0]])
    w = np.array([[1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0]])
    model = Linear(w, [0.5, -0.5])
    assert ASH("s", 60).score(model, outs(model, f)).item() == pytest.approx(
        lse([4 * math.exp(10 / 7) + 0.5, 3 * math.exp(10 / 7) - 0.5]), abs=1e-10)


def test_scale_rescales_without_pruning() -> None:
    f = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0]], dtype=torch.float64)
    np.testing.assert_allclose(SCALE(60).shape(f).numpy(), (f * math.exp(10 / 7)).numpy())
    model = Linear(np.ones((1, 5)))
    assert SCALE(60).score(model, outs(model, f)).item() == pytest.approx(10 * math.exp(10 / 7), rel=1e-12)


def test_activation_shaping_refuses_a_percentile_that_keeps_nothing() -> None:
    model = Linear(np.eye(3))
    with pytest.raises(ConfigError, match=r"detectors\.ash\.percentile=90.0 keeps no activation of 3"):
        ASH("p", 90).score(model, outs(model, np.ones((1, 3))))


# ----------------------------------------------------------------------------- SHE


def test_she_patterns_are_means_of_correctly_classified_samples() -> None:
    model = Linear(np.eye(2))  # predicts the larger coordinate
    train = [[3.0, 1.0], [5.0, 1.0], [0.0, 2.0], [2.0, 6.0], [4.0, 0.0]]
    labels = [0, 0, 1, 1, 1]  # the last is misclassified (predicted 0) and must not enter either pattern
    det = fit(SHE(), model, outs(model, train, labels))
    np.testing.assert_allclose(det.patterns.numpy(), [[4.0, 1.0], [1.0, 4.0]])
    got = score(det, model, outs(model, [[2.0, 1.0], [0.0, 1.0]]))
    np.testing.assert_allclose(got.numpy(), [2 * 4 + 1 * 1, 0 * 1 + 1 * 4])


def test_she_refuses_a_class_without_a_correct_fit_sample() -> None:
    model = Linear(np.eye(2))
    with pytest.raises(ConfigError, match=r"detectors\.she: classes \[1\]"):
        fit(SHE(), model, outs(model, [[3.0, 1.0], [4.0, 0.0]], [0, 1]))


# ----------------------------------------------------------------------------- RMDS


def test_rmds_is_class_minus_background_mahalanobis() -> None:
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal([0, 0, 0], 1, (40, 3)), rng.normal([3, 1, -1], [1, 2, 0.5], (60, 3))])
    y = np.r_[np.zeros(40, int), np.ones(60, int)]
    model = Linear(np.eye(3)[:2])
    det = fit(RMDS(), model, outs(model, x, y))
    means = np.stack([x[y == c].mean(0) for c in (0, 1)])
    prec = np.linalg.inv(np.cov((x - means[y]).T, bias=True))
    prec0 = np.linalg.inv(np.cov(x.T, bias=True))
    q = rng.normal(size=(5, 3))
    md = np.stack([np.einsum("nd,de,ne->n", q - m, prec, q - m) for m in means], 1)
    md0 = np.einsum("nd,de,ne->n", q - x.mean(0), prec0, q - x.mean(0))
    expected = -(md - md0[:, None]).min(1)
    np.testing.assert_allclose(score(det, model, outs(model, q)).numpy(), expected, rtol=1e-9)


# ----------------------------------------------------------------------------- fDBD


def test_fdbd_boundary_distances_over_distance_to_the_training_mean() -> None:
    model = Linear([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    det = fit(FDBD(), model, outs(model, [[0.0, 0.0], [2.0, 0.0]]))  # training mean (1, 0)
    # f = (2, 1): logits (2, 1, -2), predicted 0; distances 1/sqrt(2) to class 1 and 4/2 to class 2
    expected = (1 / math.sqrt(2) + 2.0) / 2 / math.sqrt(2.0)  # / (C - 1), / ||f - mean|| = sqrt(2)
    assert score(det, model, outs(model, [[2.0, 1.0]])).item() == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- NNGuide


def test_nnguide_guidance_times_energy() -> None:
    w = np.array([[1.0, 0.0], [0.0, 1.0]])
    model = Linear(w)
    bank = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    det = fit(NNGuide(k=2), model, outs(model, bank))
    energies = np.array([lse(w @ z) for z in bank])
    scaled = bank / np.linalg.norm(bank, axis=1, keepdims=True) * energies[:, None]
    q = np.array([3.0, 1.0])
    sims = np.sort(scaled @ (q / np.linalg.norm(q)))[::-1]
    expected = sims[:2].mean() * lse(w @ q)
    assert score(det, model, outs(model, [q])).item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ConfigError, match=r"detectors\.nnguide\.k.*at least 4 fit samples, got 3"):
        fit(NNGuide(k=4), model, outs(model, bank))
    assert len(fit(NNGuide(k=1, bank_fraction=0.5), model, outs(model, np.ones((10, 2)))).bank) == 5


# ----------------------------------------------------------------------------- ODIN's std (issue 17, item 2)


def test_odin_step_is_epsilon_sign_over_the_channel_std() -> None:
    gen = torch.Generator().manual_seed(4)
    model = Linear(torch.randn(3, 8, generator=gen, dtype=torch.float64))
    x = torch.randn(5, 2, 2, 2, generator=gen, dtype=torch.float64)  # 2 channels
    plain = ODIN(temperature=2.0, epsilon=0.01).perturb(model, x)
    scaled = ODIN(temperature=2.0, epsilon=0.01, input_std=[0.5, 0.25]).perturb(model, x)
    sign = ((plain - x) / 0.01).round()
    assert set(sign.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(plain, x + 0.01 * sign)
    std = torch.tensor([0.5, 0.25], dtype=torch.float64).view(1, 2, 1, 1)
    torch.testing.assert_close((scaled - x) / 0.01, sign / std)
    with pytest.raises(ConfigError, match=r"detectors\.odin\.input_std has 3 channel"):
        ODIN(input_std=[0.2, 0.2, 0.2]).perturb(model, x)


def test_mahalanobis_preprocessing_step_is_epsilon_sign_over_the_channel_std() -> None:
    rng = np.random.default_rng(6)
    x_fit = rng.normal(size=(60, 8))
    y = np.arange(60) % 2
    model = Linear(np.eye(8)[:2])
    det = fit(Mahalanobis(epsilon=0.01, input_std=[0.5, 0.25]), model, outs(model, x_fit, y))
    x = torch.tensor(rng.normal(size=(4, 2, 2, 2)), requires_grad=True)
    f = x.flatten(1)
    mu, p = det.means["penultimate"], det.precisions["penultimate"]
    closest = torch.stack([((f - m) @ p * (f - m)).sum(-1) for m in mu], 1).amin(1)
    (grad,) = torch.autograd.grad(-closest.sum(), x)  # the score moves each input towards its closest mean
    std = torch.tensor([0.5, 0.25], dtype=torch.float64).view(1, 2, 1, 1)
    x_tilde = (x + 0.01 * grad.sign() / std).detach()
    expected = score(det, model, outs(model, x_tilde.flatten(1)))
    got = det.score_batch(model, x.detach()) if isinstance(det, Scorer) else det.score_inputs(model, x.detach())
    torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------- Mahalanobis with dead units (item 4)


def test_mahalanobis_dead_unit_does_not_dominate_the_score() -> None:
    rng = np.random.default_rng(5)
    live = np.concatenate([rng.normal(0, 1, (50, 2)), rng.normal(2, 1, (50, 2))])
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    x = np.c_[live, np.zeros(100)]  # unit 2 is dead (constant) on the fit data, as 28 of 128 on the demo
    model = Linear(np.eye(3)[:2])
    det = fit(Mahalanobis(), model, outs(model, x, y))
    q_live = rng.normal(1, 1, (4, 2))
    quiet = score(det, model, outs(model, np.c_[q_live, np.zeros(4)]))
    loud = score(det, model, outs(model, np.c_[q_live, np.full(4, 100.0)]))
    # the pseudo-inverse gives the dead direction zero precision: it changes nothing ...
    torch.testing.assert_close(loud, quiet, rtol=1e-9, atol=1e-9)
    # ... and the score is that of the live units alone
    live_model = Linear(np.eye(2))
    det_live = fit(Mahalanobis(), live_model, outs(live_model, live, y))
    torch.testing.assert_close(quiet, score(det_live, live_model, outs(live_model, q_live)), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- bad parameters


@pytest.mark.parametrize("make, key", [
    (lambda: KNN(k=0), "detectors.knn.k"),
    (lambda: KNN(k=2.5), "detectors.knn.k"),
    (lambda: ViM(dim="big"), "detectors.vim.dim"),
    (lambda: ViM(dim=0), "detectors.vim.dim"),
    (lambda: GEN(gamma=0), "detectors.gen.gamma"),
    (lambda: GEN(top_m=0), "detectors.gen.top_m"),
    (lambda: GradNorm(temperature=-1), "detectors.gradnorm.temperature"),
    (lambda: DICE(sparsity=1.0), "detectors.dice.sparsity"),
    (lambda: ASH(variant="q"), "detectors.ash.variant"),
    (lambda: ASH(percentile=100), "detectors.ash.percentile"),
    (lambda: SCALE(percentile=-1), "detectors.scale.percentile"),
    (lambda: NNGuide(k=0), "detectors.nnguide.k"),
    (lambda: NNGuide(bank_fraction=0), "detectors.nnguide.bank_fraction"),
    (lambda: ODIN(input_std=[0.5, 0.0]), "detectors.odin.input_std"),
    (lambda: Mahalanobis(input_std=[]), "detectors.mahalanobis.input_std"),
])
def test_bad_parameters_name_their_key(make, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make()


@pytest.mark.parametrize("make", [KNN, ViM, DICE, SHE, RMDS, FDBD, NNGuide, KLMatching, TemperatureScaling])
def test_fitted_detectors_refuse_a_missing_fit_set(make) -> None:
    with pytest.raises(ConfigError, match="FitData.train is None"):
        make().fit(Linear(np.eye(2)), FitData(train=None))


def test_per_class_detectors_refuse_a_class_without_fit_samples() -> None:
    model = Linear(np.eye(3))
    train = outs(model, np.random.default_rng(0).normal(size=(8, 3)), [0, 1, 0, 1, 0, 1, 0, 1])
    with pytest.raises(ConfigError, match=r"detectors\.rmds: classes \[2\]"):
        fit(RMDS(), model, train)


# ----------------------------------------------------------------------------- configs


def test_all_preset_builds_every_new_detector_with_the_documented_defaults() -> None:
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    cfg = compose_cfg("train", ["data=cifar10", "detectors=all"], "/tmp/unused")
    built = {name: instantiate(spec) for name, spec in cfg.detectors.items()}
    new = {KNN, ViM, MaxLogit, Entropy, GEN, KLMatching, TemperatureScaling, GradNorm, DICE, ASH, SCALE, SHE, RMDS,
           FDBD, NNGuide}
    assert new <= {type(d) for d in built.values()}
    assert built["knn"].k == 50 and built["vim"].dim == "auto" and built["dice"].sparsity == 0.9
    assert [built[f"ash_{v}"].variant for v in "pbs"] == ["p", "b", "s"] and built["scale"].percentile == 85.0
    assert built["gen"].gamma == 0.1 and built["gen"].top_m == 100 and built["nnguide"].k == 10
    assert built["odin"].input_std == pytest.approx([0.2470, 0.2435, 0.2616])  # ${data.std}: ε in pixel units
    stripes = compose_cfg("train", ["data=stripes", "detectors=baselines"], "/tmp/unused")
    assert instantiate(stripes.detectors.odin).input_std is None  # data without a std: inputs as they are
