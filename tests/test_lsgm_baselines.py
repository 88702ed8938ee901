"""LSGM paper §4.2.1 baselines: ODIN* and Mahalanobis* with ε chosen on ID validation inputs
(Generalized ODIN's criterion: the grid's ε of the highest mean ID score).

Truths: a linear network, where the sign step and the perturbed scores are closed forms
computed here in numpy, and brute force over the grid for the selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors import ODIN, Mahalanobis
from ood_lightning.detectors.mahalanobis import MahalanobisTuned
from ood_lightning.scoring.api import FitData, Outputs
from ood_lightning.scoring.input_step import best_epsilon, mean_scores_over_epsilons

STD = np.array([0.5, 1.0, 2.0, 0.25])  # per-"channel" std of the 4 input coordinates


class LinearNet(torch.nn.Module):
    """block1 = A1 x, penultimate = A2 x, logits = W · penultimate (float64 throughout)."""

    def __init__(self, a1: np.ndarray, a2: np.ndarray, w: np.ndarray) -> None:
        super().__init__()
        self.a1 = torch.nn.Parameter(torch.as_tensor(a1), requires_grad=False)
        self.a2 = torch.nn.Parameter(torch.as_tensor(a2), requires_grad=False)
        self.w = torch.nn.Parameter(torch.as_tensor(w), requires_grad=False)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        return {"block1": x @ self.a1.T, "penultimate": x @ self.a2.T}

    def classify(self, features: Tensor) -> Tensor:
        return features @ self.w.T

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.forward_features(x)["penultimate"])


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    a1, a2, w = rng.standard_normal((3, 4)), rng.standard_normal((2, 4)), rng.standard_normal((3, 2))
    centres = 2.0 * rng.standard_normal((3, 4))
    labels = np.repeat(np.arange(3), 40)
    x_train = centres[labels] + rng.standard_normal((120, 4))
    x_val = centres[np.arange(30) % 3] + rng.standard_normal((30, 4))
    return LinearNet(a1, a2, w), x_train, labels, x_val


def outputs_of(net: LinearNet, x: np.ndarray, labels: np.ndarray) -> Outputs:
    with torch.no_grad():
        xt = torch.as_tensor(x)
        feats = net.forward_features(xt)
        return Outputs(logits=net(xt), features=feats["penultimate"], layers=feats, labels=torch.as_tensor(labels))


# ----------------------------------------------------------------------------- closed forms

def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def odin_closed_form(net: LinearNet, x: np.ndarray, eps: float, t: float) -> tuple[np.ndarray, np.ndarray]:
    """x̃ = x + ε·sign(∇ₓ log softmax_ŷ(Mx/T))/std with ∇ = (M_ŷ − pᵀM)/T, and max softmax(Mx̃/T)."""
    m = net.w.numpy() @ net.a2.numpy()
    p = softmax(x @ m.T / t)
    y = (x @ m.T).argmax(1)
    grad = (m[y] - p @ m) / t
    x_tilde = x + eps * np.sign(grad) / STD
    return x_tilde, softmax(x_tilde @ m.T / t).max(1)


def gaussian_fit(f: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the pseudo-inverse of the tied MLE covariance (Lee et al.)."""
    means = np.stack([f[labels == c].mean(0) for c in range(3)])
    centred = f - means[labels]
    return means, np.linalg.pinv(centred.T @ centred / len(f))


def mahalanobis_closed_form(net: LinearNet, x_train: np.ndarray, labels: np.ndarray, x: np.ndarray,
                            eps: float) -> np.ndarray:
    """Σ_l score_l(A_l x̃_l), x̃_l = x + ε·sign(−2 A_lᵀ P_l (A_l x − μ_{l,c*}))/std, c* the closest mean."""
    total = np.zeros(len(x))
    for a in (net.a1.numpy(), net.a2.numpy()):
        means, prec = gaussian_fit(x_train @ a.T, labels)

        def dists(f, means=means, prec=prec):
            d = f[:, None, :] - means[None]
            return np.einsum("ncd,de,nce->nc", d, prec, d)

        f = x @ a.T
        nearest = dists(f).argmin(1)
        grad = -2 * (f - means[nearest]) @ prec @ a  # ∇ₓ of −(Ax − μ)ᵀP(Ax − μ)
        x_tilde = x + eps * np.sign(grad) / STD
        total += -dists(x_tilde @ a.T).min(1)
    return total


# ------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("eps", [0.0, 0.01, 0.3])
def test_odin_perturbation_and_score_are_the_closed_form(problem, eps: float) -> None:
    net, _, _, x_val = problem
    det = ODIN(temperature=10.0, epsilon=eps, input_std=STD.tolist())
    x_tilde, score = odin_closed_form(net, x_val, eps, 10.0)
    np.testing.assert_allclose(det.perturb(net, torch.as_tensor(x_val)).numpy(), x_tilde, rtol=0, atol=1e-12)
    np.testing.assert_allclose(det.score_batch(net, torch.as_tensor(x_val)).numpy(), score, rtol=1e-10)


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.5])
def test_mahalanobis_perturbation_and_score_are_the_closed_form(problem, eps: float) -> None:
    net, x_train, labels, x_val = problem
    det = Mahalanobis(layers="all", epsilon=eps, input_std=STD.tolist()).fit_outputs(outputs_of(net, x_train, labels))
    expected = mahalanobis_closed_form(net, x_train, labels, x_val, eps)
    np.testing.assert_allclose(det.score_batch(net, torch.as_tensor(x_val)).numpy(), expected, rtol=1e-9)


def test_odin_star_picks_the_grid_maximum_of_the_mean_id_score(problem) -> None:
    net, _, _, x_val = problem
    grid = [0.0, 0.01, 0.05, 0.2, 1.0]
    det = ODIN(temperature=1000.0, epsilon=0.0014, input_std=STD.tolist(), epsilons=grid, batch_size=7)
    assert det.needs_fit and not ODIN().needs_fit
    det.fit(net, FitData(val_inputs=torch.as_tensor(x_val)))
    brute = np.array([odin_closed_form(net, x_val, e, 1000.0)[1].mean() for e in grid])
    assert brute.argmax() != brute.argmin()  # a selection by min would pick another ε
    np.testing.assert_allclose([det.search[e] for e in grid], brute, rtol=1e-12)
    assert det.epsilon == grid[int(brute.argmax())]
    assert det.per_batch == (det.epsilon > 0)


def test_mahalanobis_star_picks_the_grid_maximum_of_the_mean_id_score(problem) -> None:
    net, x_train, labels, x_val = problem
    grid = [0.0, 0.02, 0.1, 0.3, 1.0, 3.0]
    det = Mahalanobis(layers="all", input_std=STD.tolist(), epsilons=grid, batch_size=7)
    det.fit(net, FitData(train=outputs_of(net, x_train, labels), val_inputs=torch.as_tensor(x_val)))
    brute = np.array([mahalanobis_closed_form(net, x_train, labels, x_val, e).mean() for e in grid])
    best = int(brute.argmax())
    assert 0 < best < len(grid) - 1  # an interior maximum: min, first and last all pick another ε
    np.testing.assert_allclose([det.search[e] for e in grid], brute, rtol=1e-10)
    assert det.epsilon == grid[best]


def test_search_mean_over_uneven_batches_and_ties_go_to_the_smallest_epsilon() -> None:
    x = torch.arange(10, dtype=torch.float64)[:, None]
    search = mean_scores_over_epsilons(x, [0.0, 1.0, 2.0], 4, lambda b: torch.ones_like(b),
                                       lambda b, d, e: -((b + e * d - 5.0) ** 2).squeeze(1))
    for e, s in search.items():  # the mean over all 10 inputs, not of the 3 batch means
        assert s == pytest.approx(float(-((np.arange(10) + e - 5.0) ** 2).mean()))
    assert best_epsilon(search) == 0.0
    assert best_epsilon({0.04: 1.0, 0.01: 1.0, 0.0: 0.5}) == 0.01


def test_epsilon_search_rejects_bad_input(problem) -> None:
    net, *_ = problem
    with pytest.raises(ConfigError, match="epsilons"):
        ODIN(epsilons=[])
    with pytest.raises(ConfigError, match="epsilons"):
        Mahalanobis(epsilons=[0.01, -0.1])
    with pytest.raises(ConfigError, match="val_inputs"):
        ODIN(epsilons=[0.01]).fit(net, FitData())
    with pytest.raises(ConfigError, match="MahalanobisTuned"):
        MahalanobisTuned(epsilons=[0.01])


def test_lsgm_preset_turns_the_search_on_for_odin_star_and_mahalanobis_star(tmp_path) -> None:
    from ood_lightning.run.build import build_detectors
    from tests.conftest import compose_cfg

    grid = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)
    dets = build_detectors(compose_cfg("train", ["method=lsgm", "data=cifar10"], tmp_path))
    assert dets["odin"].epsilons == grid and dets["mahalanobis_ensemble"].epsilons == grid
    assert dets["mahalanobis"].epsilons is None  # "Mahalanobis (penultimate layer)": the plain row
    plain = build_detectors(compose_cfg("train", ["data=cifar10"], tmp_path))
    assert plain["odin"].epsilons is None and plain["mahalanobis_ensemble"].epsilons is None
    assert build_detectors(compose_cfg("train", ["method=lsgm", "detectors=none"], tmp_path)) == {}


def test_the_chosen_epsilon_is_reported_and_written_to_metrics_json(problem, tmp_path) -> None:
    """A reader of the table must see which ε won: ``Scorer.selected`` is the search's argmax, the
    evaluation loop collects it, and ``metrics.json`` holds it beside the mean score per grid value."""
    import json

    from ood_lightning.run.runs import score_and_write
    from tests.conftest import TINY, untrained_run

    net, _, _, x_val = problem
    grid = [0.0, 0.01, 0.05, 0.2, 1.0]
    det = ODIN(temperature=1000.0, input_std=STD.tolist(), epsilons=grid).fit(net, FitData(val_inputs=torch.as_tensor(x_val)))
    brute = [odin_closed_form(net, x_val, e, 1000.0)[1].mean() for e in grid]
    assert det.selected()["epsilon"] == grid[int(np.argmax(brute))]
    assert ODIN().selected() == {} and Mahalanobis().selected() == {}

    cfg, dm, model = untrained_run([*TINY, "data.n_train=200", "data.val_size=40", "data.n_test=60", "ood.diagonal.n=50",
                                    "+detectors.odin={_target_: ood_lightning.detectors.ODIN, epsilons: [0.0, 0.01, 0.1]}"],
                                   tmp_path)
    score_and_write(model, dm, cfg, tmp_path, {}, torch.device("cpu"))
    written = json.loads((tmp_path / "metrics.json").read_text())["selected"]
    assert set(written) == {"odin"}  # the detectors that chose nothing are absent
    means = {float(e): s for e, s in written["odin"]["mean_id_val_score"].items()}
    assert sorted(means) == [0.0, 0.01, 0.1]
    assert written["odin"]["epsilon"] == best_epsilon(means)
