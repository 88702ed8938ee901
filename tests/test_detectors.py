"""Post-hoc detectors against independent truths: hand formulas, numpy, scipy, finite differences,
and each baseline's paper formula on a hand-computable case, chosen so that the plausible wrong
implementations (sign flip, k off by one, squared vs plain distance, mean vs sum, wrong centre,
wrong layer) fail."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors import (
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
    fit_logistic_weights,
)
from ood_lightning.detectors.knn import kth_neighbour_distance
from ood_lightning.detectors.temperature_scaling import fit_inverse_temperature
from ood_lightning.scoring.api import FitData, Outputs, Scorer, pool


class TinyMLP(nn.Module):
    """A FeatureModel: two ReLU blocks ("block1", "penultimate") and a linear head."""

    def __init__(self, d_in: int = 8, hidden: int = 32, n_classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        b1 = F.relu(self.fc1(x))
        return {"block1": b1, "penultimate": F.relu(self.fc2(b1))}

    def classify(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.forward_features(x)["penultimate"])


class Logistic(nn.Module):
    """A linear (logistic-regression) FeatureModel whose penultimate features are the input."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(weight.shape[1], weight.shape[0]).double()
        with torch.no_grad():
            self.lin.weight.copy_(weight)
            self.lin.bias.copy_(bias)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        return {"penultimate": x}

    def classify(self, features: Tensor) -> Tensor:
        return self.lin(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(x)


def outputs_of(model: nn.Module, x: Tensor, labels: Tensor | None = None) -> Outputs:
    with torch.no_grad():
        feats = model.forward_features(x)
        return Outputs(
            logits=model.classify(feats["penultimate"]),
            features=feats["penultimate"],
            layers={k: pool(v) for k, v in feats.items()},
            labels=labels,
        )


def finite_diff_grad(fn, x: Tensor, h: float = 1e-5) -> Tensor:
    """Central differences of a per-sample scalar function fn: [B, D] -> [B] (float64)."""
    grad = torch.zeros_like(x)
    for j in range(x.shape[1]):
        step = torch.zeros_like(x)
        step[:, j] = h
        grad[:, j] = (fn(x + step) - fn(x - step)) / (2 * h)
    return grad


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def mlp64() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP(d_in=3, hidden=6, n_classes=3).double()


# ----------------------------------------------------------------------------- MSP / Energy


def test_msp_matches_hand_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 5.0, 1.0]])
    e = np.exp(logits.numpy().astype(np.float64))
    expected = (e / e.sum(1, keepdims=True)).max(1)
    got = MSP().score(None, Outputs(logits=logits, features=torch.zeros(3, 1)))  # type: ignore[arg-type]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    assert got[1].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_energy_matches_hand_logsumexp(temperature: float) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(16, 5, generator=gen)
    lg = logits.numpy().astype(np.float64)
    expected = temperature * np.log(np.exp(lg / temperature).sum(1))
    got = Energy(temperature).score(None, Outputs(logits=logits, features=logits))  # type: ignore[arg-type]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_energy_tends_to_max_logit_as_temperature_vanishes() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(32, 4, generator=gen)
    out = Outputs(logits=logits, features=logits)
    max_logit = logits.max(-1).values
    gap_warm = (Energy(1.0).score(None, out) - max_logit).abs()  # type: ignore[arg-type]
    gap_cold = (Energy(1e-3).score(None, out) - max_logit).abs()  # type: ignore[arg-type]
    assert gap_cold.max() <= 1e-3 * np.log(4) + 1e-5  # T·log C bounds the excess
    assert gap_warm.min() > 0.1  # at T = 1 it is a genuinely different score


# ----------------------------------------------------------------------------- ODIN


def test_odin_epsilon_zero_is_temperature_scaled_msp(mlp64: TinyMLP) -> None:
    x = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    logits = mlp64(x).detach().numpy()
    e = np.exp(logits / 7.0)
    expected = (e / e.sum(1, keepdims=True)).max(1)
    det = ODIN(temperature=7.0, epsilon=0.0)
    np.testing.assert_allclose(det.score_batch(mlp64, x).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(det.score(mlp64, outputs_of(mlp64, x)).numpy(), expected, rtol=1e-5)
    assert not det.per_batch and ODIN().per_batch


def test_odin_epsilon_zero_computes_no_gradient() -> None:
    calls: list[tuple[bool, bool]] = []

    class Spy(Logistic):
        def forward(self, x: Tensor) -> Tensor:
            calls.append((torch.is_grad_enabled(), x.requires_grad))
            return super().forward(x)

    model = Spy(torch.tensor([[1.0, -2.0], [0.5, 1.0]]), torch.zeros(2))
    x = torch.randn(4, 2, dtype=torch.float64)
    ODIN(epsilon=0.0).score_batch(model, x)
    assert calls and not any(grad or req for grad, req in calls)
    calls.clear()
    ODIN(epsilon=0.1).score_batch(model, x)
    assert calls[0] == (True, True)  # the spy does see the gradient pass when ε > 0


@pytest.mark.parametrize("model_kind", ["logistic", "mlp"])
def test_odin_perturbation_follows_finite_difference_sign(model_kind: str, mlp64: TinyMLP) -> None:
    gen = torch.Generator().manual_seed(4)
    if model_kind == "logistic":
        model: nn.Module = Logistic(torch.tensor([[2.0, -1.0], [-1.0, 0.5]]), torch.tensor([0.3, -0.2]))
        x = torch.randn(12, 2, dtype=torch.float64, generator=gen)
    else:
        model = mlp64
        x = torch.randn(12, 3, dtype=torch.float64, generator=gen)
    temperature, eps = 2.0, 0.05
    pred = model(x).argmax(-1)

    def log_softmax_pred(z: Tensor) -> Tensor:
        with torch.no_grad():
            return (model(z) / temperature).log_softmax(-1).gather(1, pred[:, None])[:, 0]

    fd_sign = finite_diff_grad(log_softmax_pred, x).sign()
    assert (fd_sign != 0).all()
    det = ODIN(temperature=temperature, epsilon=eps)
    x_tilde = det.perturb(model, x)
    torch.testing.assert_close((x_tilde - x) / eps, fd_sign)
    # Moving that way increases the predicted class's softmax (for a step this small).
    assert (log_softmax_pred(x_tilde) > log_softmax_pred(x)).all()
    # And the score is the temperature-scaled max softmax at the hand-perturbed input.
    with torch.no_grad():
        expected = (model(x + eps * fd_sign) / temperature).softmax(-1).amax(-1)
    torch.testing.assert_close(det.score_batch(model, x), expected)


@pytest.mark.parametrize("train_mode", [True, False])
def test_odin_under_no_grad_leaves_params_and_mode_alone(train_mode: bool, mlp64: TinyMLP) -> None:
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    mlp64.train(train_mode)
    det = ODIN(temperature=1000.0, epsilon=0.01)
    free = det.score_batch(mlp64, x)
    with torch.no_grad():
        inside = det.score_batch(mlp64, x)
    torch.testing.assert_close(inside, free)
    assert not inside.requires_grad
    assert all(p.grad is None for p in mlp64.parameters())
    assert mlp64.training is train_mode
    mlp64.eval()
    # The perturbation is real: it changes the score compared with ε = 0.
    assert not torch.allclose(free, ODIN(1000.0, 0.0).score_batch(mlp64, x), rtol=0, atol=1e-9)
    with pytest.raises(RuntimeError, match="score_batch"):
        det.score(mlp64, outputs_of(mlp64, x))


# ----------------------------------------------------------------------------- ReAct


def test_react_threshold_is_numpy_percentile(mlp64: TinyMLP) -> None:
    x = torch.randn(200, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    train = outputs_of(mlp64, x)
    for q in (50.0, 90.0, 99.0):
        det = ReAct(percentile=q).fit(mlp64, FitData(train))
        assert det.threshold == pytest.approx(np.percentile(train.features.numpy(), q), rel=1e-9)


def test_react_percentile_100_equals_energy_on_train(mlp64: TinyMLP) -> None:
    x = torch.randn(100, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    train = outputs_of(mlp64, x)
    det = ReAct(percentile=100.0, temperature=2.0).fit(mlp64, FitData(train))
    torch.testing.assert_close(det.score(mlp64, train), Energy(2.0).score(mlp64, train))
    # A lower percentile really clips, and lowers the energy of clipped samples here.
    clipped = ReAct(percentile=50.0).fit(mlp64, FitData(train)).score(mlp64, train)
    assert not torch.allclose(clipped, Energy().score(mlp64, train))


def test_react_scores_clipped_features_by_hand() -> None:
    head = Logistic(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]), torch.tensor([0.0, 1.0]))
    train = Outputs(logits=torch.zeros(4, 2), features=torch.tensor([[0.0, 1.0], [2.0, 3.0], [1.0, 2.0], [3.0, 0.0]]))
    det = ReAct(percentile=100.0).fit(head, FitData(train))
    assert det.threshold == 3.0
    test = Outputs(logits=torch.zeros(1, 2), features=torch.tensor([[1.0, 10.0]], dtype=torch.float64))
    logits = np.array([1 * 1 + 2 * 3 + 0.0, -1 * 1 + 0.5 * 3 + 1.0])  # features clipped to [1, 3]
    assert det.score(head, test).item() == pytest.approx(np.log(np.exp(logits).sum()), rel=1e-6)


def test_react_threshold_is_numpys_exact_percentile_beyond_torch_quantiles_limit() -> None:
    gen = torch.Generator().manual_seed(8)
    feats = torch.rand(2**24 // 64 + 7, 64, generator=gen)  # > 2**24 values: torch.quantile refuses these
    train = Outputs(logits=torch.zeros(len(feats), 2), features=feats)
    det = ReAct(percentile=90.0).fit(None, FitData(train))
    assert det.threshold == pytest.approx(float(np.percentile(feats.numpy().astype(np.float64), 90.0)), rel=1e-12)


def test_react_score_before_fit_raises(mlp64: TinyMLP) -> None:
    out = outputs_of(mlp64, torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="before fit"):
        ReAct().score(mlp64, out)


# ----------------------------------------------------------------------------- Mahalanobis


def gaussian_classes(seed: int, dim: int = 4, counts: tuple[int, ...] = (300, 500, 400)):
    """Samples of N(μ_c, Σ) with a known shared Σ = A Aᵀ and unequal class sizes."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim))
    sigma = a @ a.T + 0.5 * np.eye(dim)
    mus = rng.normal(scale=4.0, size=(len(counts), dim))
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    x = mus[labels] + rng.multivariate_normal(np.zeros(dim), sigma, size=len(labels))
    return x, labels, mus, sigma


def as_outputs(x: np.ndarray, labels: np.ndarray | None = None, **layers: np.ndarray) -> Outputs:
    feats = torch.from_numpy(x)
    return Outputs(
        logits=torch.zeros(len(x), 2),
        features=feats,
        layers={k: torch.from_numpy(v) for k, v in layers.items()},
        labels=None if labels is None else torch.from_numpy(labels),
    )


def test_mahalanobis_statistics_match_numpy() -> None:
    x, labels, mus, sigma = gaussian_classes(seed=0)
    det = Mahalanobis().fit_outputs(as_outputs(x, labels))
    means = np.stack([x[labels == c].mean(0) for c in range(3)])
    centred = x - means[labels]
    cov = np.cov(centred.T, bias=True)  # tied MLE covariance, divided by N
    np.testing.assert_allclose(det.means["penultimate"].numpy(), means, rtol=1e-10)
    np.testing.assert_allclose(det.covariances["penultimate"].numpy(), cov, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(det.precisions["penultimate"].numpy(), np.linalg.inv(cov), rtol=1e-8)
    # And the estimates are close to the generating parameters.
    np.testing.assert_allclose(means, mus, atol=0.5)
    np.testing.assert_allclose(cov, sigma, atol=0.25 * np.abs(sigma).max())


def test_mahalanobis_score_is_minus_min_scipy_distance() -> None:
    x, labels, _, _ = gaussian_classes(seed=1)
    det = Mahalanobis().fit_outputs(as_outputs(x, labels))
    means = det.means["penultimate"].numpy()
    precision = det.precisions["penultimate"].numpy()
    test = np.random.default_rng(2).normal(scale=5.0, size=(20, 4))
    expected = [-min(scipy_mahalanobis(f, m, precision) ** 2 for m in means) for f in test]
    got = det.score(None, as_outputs(test))  # type: ignore[arg-type]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)


def test_mahalanobis_multi_layer_is_weighted_sum_of_layers() -> None:
    x, labels, _, _ = gaussian_classes(seed=3)
    other = np.tanh(x[:, :3]) * 2 + 0.1 * np.random.default_rng(4).normal(size=(len(x), 3))
    train = as_outputs(x, labels, early=other, penultimate=x)
    test_x, _, _, _ = gaussian_classes(seed=5, counts=(5, 5, 5))
    test = as_outputs(test_x, None, early=np.tanh(test_x[:, :3]) * 2, penultimate=test_x)
    per_layer = {
        name: Mahalanobis(layers=(name,)).fit_outputs(train).score(None, test)
        for name in ("early", "penultimate")
    }
    both = Mahalanobis(layers="all").fit_outputs(train)
    assert both.layer_names == ["early", "penultimate"]
    torch.testing.assert_close(both.score(None, test), per_layer["early"] + per_layer["penultimate"])  # type: ignore[arg-type]
    weighted = Mahalanobis(layers=["early", "penultimate"], layer_weights=[2.0, -0.5]).fit_outputs(train)
    torch.testing.assert_close(
        weighted.score(None, test),
        2.0 * per_layer["early"] - 0.5 * per_layer["penultimate"],  # type: ignore[arg-type]
    )


def test_mahalanobis_penultimate_falls_back_to_features() -> None:
    x, labels, _, _ = gaussian_classes(seed=6)
    det = Mahalanobis(layers="all").fit_outputs(as_outputs(x, labels))
    assert det.layer_names == ["penultimate"]
    with pytest.raises(KeyError, match="block9"):
        Mahalanobis(layers=("block9",)).fit_outputs(as_outputs(x, labels))


def test_mahalanobis_full_shrinkage_gives_scaled_identity_precision() -> None:
    x, labels, _, _ = gaussian_classes(seed=7)
    raw = Mahalanobis().fit_outputs(as_outputs(x, labels))
    shrunk = Mahalanobis(shrinkage=1.0).fit_outputs(as_outputs(x, labels))
    cov = raw.covariances["penultimate"].numpy()
    expected = 4 / np.trace(cov) * np.eye(4)
    np.testing.assert_allclose(shrunk.precisions["penultimate"].numpy(), expected, rtol=1e-10, atol=1e-14)
    half = Mahalanobis(shrinkage=0.5).fit_outputs(as_outputs(x, labels))
    np.testing.assert_allclose(
        half.covariances["penultimate"].numpy(), 0.5 * cov + 0.5 * np.trace(cov) / 4 * np.eye(4), rtol=1e-10
    )


def test_mahalanobis_input_preprocessing_matches_finite_differences(mlp64: TinyMLP) -> None:
    gen = torch.Generator().manual_seed(9)
    x_train = torch.randn(300, 3, dtype=torch.float64, generator=gen)
    labels = (x_train[:, 0] > 0).long() + (x_train[:, 1] > 0.5).long()
    train = outputs_of(mlp64, x_train, labels)
    eps = 0.02
    det = Mahalanobis(layers="all", epsilon=eps, shrinkage=0.1).fit_outputs(train)
    clean = Mahalanobis(layers="all", shrinkage=0.1).fit_outputs(train)
    assert det.per_batch and not clean.per_batch
    x = torch.randn(10, 3, dtype=torch.float64, generator=gen)

    expected = torch.zeros(10, dtype=torch.float64)
    for name in ("block1", "penultimate"):
        single = Mahalanobis(layers=(name,), shrinkage=0.1).fit_outputs(train)

        def layer_score(z: Tensor, single: Mahalanobis = single) -> Tensor:
            return single.score(mlp64, outputs_of(mlp64, z))

        x_tilde = x + eps * finite_diff_grad(layer_score, x).sign()
        assert (layer_score(x_tilde) > layer_score(x)).all()  # closer to its nearest class
        expected += layer_score(x_tilde)

    mlp64.train()
    with torch.no_grad():
        got = det.score_batch(mlp64, x)
    assert mlp64.training
    mlp64.eval()
    torch.testing.assert_close(got, expected)
    assert all(p.grad is None for p in mlp64.parameters())
    torch.testing.assert_close(clean.score_batch(mlp64, x), clean.score(mlp64, outputs_of(mlp64, x)))


def test_fit_logistic_weights_favours_the_informative_layer() -> None:
    rng = np.random.default_rng(10)
    id_scores = {
        "useful": torch.from_numpy(rng.normal(0.0, 1.0, 400)),
        "noise": torch.from_numpy(rng.normal(0, 1, 400)),
    }
    ood_scores = {
        "useful": torch.from_numpy(rng.normal(-3.0, 1.0, 400)),
        "noise": torch.from_numpy(rng.normal(0, 1, 400)),
    }
    w = fit_logistic_weights(id_scores, ood_scores)
    assert isinstance(w, dict) and list(w) == ["useful", "noise"]
    assert w["useful"] > 1.0 and abs(w["noise"]) < 0.2 * w["useful"]
    # Array form, with the useful column scaled by 100: the raw-unit weight scales by 1/100.
    as_array = fit_logistic_weights(
        np.stack([100 * id_scores["useful"].numpy(), id_scores["noise"].numpy()], 1),
        np.stack([100 * ood_scores["useful"].numpy(), ood_scores["noise"].numpy()], 1),
    )
    assert isinstance(as_array, list) and as_array[0] == pytest.approx(w["useful"] / 100, rel=1e-3)


# ----------------------------------------------------------------------------- config / sanity


@pytest.mark.parametrize("preset", ["baselines", "fast", "godin", "none", "all"])
def test_every_detector_preset_builds_detectors(preset: str) -> None:
    """What train.py builds from conf/detectors/<preset>.yaml: Scorer instances, none missing."""
    from ood_lightning.run.build import build_detectors
    from tests.conftest import compose_cfg

    cfg = compose_cfg("train", [f"detectors={preset}"], "/tmp/unused")
    built = build_detectors(cfg)
    assert set(built) == {k for k, v in (cfg.detectors or {}).items() if v is not None}
    assert all(isinstance(det, Scorer) for det in built.values())
    assert (preset == "none") == (not built)


def test_baseline_preset_has_the_papers_settings() -> None:
    from ood_lightning.run.build import build_detectors
    from tests.conftest import compose_cfg

    built = build_detectors(compose_cfg("train", ["detectors=baselines"], "/tmp/unused"))
    assert {type(d) for d in built.values()} == {MSP, ODIN, Energy, ReAct, Mahalanobis, KNN, ViM, MaxLogit}
    assert built["odin"].temperature == 1000.0 and built["odin"].epsilon == 0.0014  # Liang et al.'s CIFAR setting
    assert built["react"].percentile == 90.0  # Sun et al.
    assert built["mahalanobis"].layers == ("penultimate",) and not built["mahalanobis"].per_batch


@pytest.fixture(scope="module")
def toy_problem():
    """A 3-class 8-D Gaussian ID problem, a trained TinyMLP, and OOD shifted off the data plane."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    angles = torch.arange(3) * 2 * np.pi / 3
    mus = torch.zeros(3, 8)
    mus[:, 0], mus[:, 1] = 4 * torch.cos(angles), 4 * torch.sin(angles)
    y = torch.arange(3).repeat_interleave(200)
    x = mus[y] + torch.randn(len(y), 8, generator=gen)
    y_test = torch.arange(3).repeat_interleave(100)
    x_test = mus[y_test] + torch.randn(len(y_test), 8, generator=gen)
    x_ood = torch.randn(300, 8, generator=gen)
    x_ood[:, 2:] += 3.0  # ID only varies by unit noise in these six directions

    model = TinyMLP(d_in=8, hidden=32, n_classes=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    assert accuracy > 0.95
    return model, outputs_of(model, x, y), x_test, x_ood


@pytest.mark.parametrize(
    "detector",
    [
        MSP(),
        Energy(),
        ODIN(),
        ReAct(),
        Mahalanobis(),
        Mahalanobis(layers="all", epsilon=0.01),
    ],
    ids=["msp", "energy", "odin", "react", "mahalanobis", "mahalanobis_all_eps"],
)
def test_detectors_separate_far_ood(detector: Scorer, toy_problem) -> None:
    model, train, x_test, x_ood = toy_problem
    detector.fit(model, FitData(train))
    if detector.per_batch:
        s_id, s_ood = detector.score_batch(model, x_test), detector.score_batch(model, x_ood)
    else:
        s_id, s_ood = detector.score(model, outputs_of(model, x_test)), detector.score(model, outputs_of(model, x_ood))
    assert s_id.shape == (len(x_test),) and s_ood.shape == (len(x_ood),)
    scores = np.concatenate([s_id.numpy(), s_ood.numpy()])
    is_id = np.concatenate([np.ones(len(s_id)), np.zeros(len(s_ood))])
    assert roc_auc_score(is_id, scores) > 0.9


def test_mahalanobis_tuned_weights_beat_equal_weights_when_a_layer_is_uninformative():
    """A 2-d layer separates ID from OOD; a 200-d layer is the same for both but its
    Mahalanobis scores spread ~10x wider. Equal weights drown the signal; the logistic
    regression (which uses OOD data) recovers it on fresh data."""
    from sklearn.metrics import roc_auc_score

    from ood_lightning.detectors import Mahalanobis, MahalanobisTuned
    from ood_lightning.scoring.api import Outputs

    g = torch.Generator().manual_seed(0)

    def outputs(shift: float, m: int) -> Outputs:
        lab = torch.arange(m) % 2
        good = torch.tensor([[4.0, 0.0], [-4.0, 0.0]])[lab] + torch.randn(m, 2, generator=g) + shift
        noise = torch.randn(m, 200, generator=g)
        return Outputs(logits=torch.zeros(m, 2), features=good, layers={"noise": noise, "penultimate": good}, labels=lab)

    train = outputs(0.0, 2000)
    tuned = MahalanobisTuned(layers="all").fit_outputs(train)
    plain = Mahalanobis(layers="all").fit_outputs(train)
    assert tuned.tunes_on_ood and not plain.tunes_on_ood
    tuned.fit(None, FitData(val=outputs(0.0, 300), ood_tune=outputs(2.5, 300)))
    id_test, ood_test = outputs(0.0, 1000), outputs(2.5, 1000)

    def auroc(det):
        s = torch.cat([det.score(None, id_test), det.score(None, ood_test)]).numpy()
        return roc_auc_score(np.r_[np.ones(1000), np.zeros(1000)], s)

    assert auroc(tuned) > 0.9
    assert auroc(tuned) > auroc(plain) + 0.15


# == the other post-hoc baselines, each against its paper's formula ============================

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


# ----------------------------------------------------------------------------- ODIN's std


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
