"""LSGM against independent truths: brute-force trace enumeration, sklearn's GMM likelihood,
and synthetic traces whose per-layer marginals are ID but whose layer-to-layer moves are not."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture
from torch import Tensor

from ood_lightning.detectors.lsgm import LSGM, forward_algorithm, scoring_time
from ood_lightning.scoring.api import Outputs


def make_outputs(layers: dict[str, np.ndarray], labels: np.ndarray | None = None) -> Outputs:
    """Outputs whose ``layers`` are the given arrays (the last one doubles as features)."""
    t = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in layers.items()}
    last = list(t.values())[-1]
    return Outputs(logits=torch.zeros(len(last), 2), features=last, layers=t,
                   labels=None if labels is None else torch.as_tensor(labels))


def transition_traces(n: int, k: int, shift: int, seed: int) -> Outputs:
    """Two 2-D layers, k clusters each (equally populated); cluster j at layer 1 moves to
    cluster (j + shift) mod k at layer 2. Any shift gives the same per-layer marginals."""
    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * np.arange(k) / k
    centres = 6.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    j = rng.permutation(np.arange(n) % k)
    h1 = centres[j] + 0.5 * rng.standard_normal((n, 2))
    h2 = 1.5 * centres[(j + shift) % k] + 0.5 * rng.standard_normal((n, 2))
    return make_outputs({"block1": h1, "penultimate": h2}, labels=j)


def brute_force(log_init: Tensor, log_trans: list[Tensor], log_em: list[Tensor]) -> Tensor:
    """log Σ over every trace z_1..z_m, enumerated."""
    sizes = [e.shape[1] for e in log_em]
    terms = []
    for trace in itertools.product(*(range(s) for s in sizes)):
        t = log_init[trace[0]] + log_em[0][:, trace[0]]
        for i in range(1, len(trace)):
            t = t + log_trans[i - 1][trace[i - 1], trace[i]] + log_em[i][:, trace[i]]
        terms.append(t)
    return torch.logsumexp(torch.stack(terms, 1), 1)


@pytest.mark.parametrize("k,m", [(2, 2), (3, 2), (2, 4), (3, 3), (3, 4)])
def test_forward_algorithm_matches_enumeration(k: int, m: int) -> None:
    g = torch.Generator().manual_seed(10 * k + m)
    sizes = [k + (i % 2) for i in range(m)]  # rectangular transitions too
    log_init = torch.log_softmax(torch.randn(sizes[0], generator=g, dtype=torch.float64), 0)
    log_trans = [torch.log_softmax(3 * torch.randn(a, b, generator=g, dtype=torch.float64), 1)
                 for a, b in zip(sizes, sizes[1:])]
    log_em = [50 * torch.randn(6, s, generator=g, dtype=torch.float64) for s in sizes]  # wide range: tests shifts
    torch.testing.assert_close(forward_algorithm(log_init, log_trans, log_em), brute_force(log_init, log_trans, log_em))


def test_forward_algorithm_zero_transitions_stay_exact() -> None:
    """With impossible transitions the underflow fallback must still give the exact value."""
    log_init = torch.tensor([0.0, -1000.0], dtype=torch.float64)
    log_trans = [torch.log(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))]
    log_em = [torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[-1000.0, 0.0]], dtype=torch.float64)]
    torch.testing.assert_close(forward_algorithm(log_init, log_trans, log_em), brute_force(log_init, log_trans, log_em))


@pytest.mark.parametrize("covariance_type,pca_dim,standardize", [("full", None, True), ("diag", None, True),
                                                                 ("full", 2, True), ("full", None, False)])
def test_one_layer_equals_sklearn_gmm(covariance_type: str, pca_dim: int | None, standardize: bool) -> None:
    """One layer is that layer's mixture: on raw features (the paper's, the default) or standardised
    (and PCA'd) ones, scored as scikit-learn's GaussianMixture scores the same transform."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (150, 4)) * [1, 2, 3, 4], rng.normal(3, 0.5, (150, 4))])
    x_test = rng.normal(1, 2, (50, 4))
    x, x_test = (a.astype(np.float32).astype(np.float64) for a in (x, x_test))  # what Outputs stores
    det = LSGM(layers="all", n_components=3, mixture="gmm", covariance_type=covariance_type, reg_covar=1e-4,
               pca_dim=pca_dim, standardize=standardize, max_iter=100).fit_outputs(make_outputs({"penultimate": x}))
    mean, std = (x.mean(0), x.std(0)) if standardize else (0.0, 1.0)
    z, z_test = (x - mean) / std, (x_test - mean) / std
    if pca_dim is not None:
        pca = PCA(pca_dim, random_state=0).fit(z)
        z, z_test = pca.transform(z), pca.transform(z_test)
    gmm = GaussianMixture(3, covariance_type=covariance_type, reg_covar=1e-4, max_iter=100, random_state=0).fit(z)
    got = det.score(None, make_outputs({"penultimate": x_test}))
    np.testing.assert_allclose(got.numpy(), gmm.score_samples(z_test), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(det.layer_log_likelihoods(make_outputs({"penultimate": x_test}))["penultimate"], got)


@pytest.mark.parametrize("transitions", ["hard", "soft"])
def test_transitions_separate_what_per_layer_gmms_cannot(transitions: str) -> None:
    k = 4
    train, id_test, ood = (transition_traces(n, k, shift, seed) for n, shift, seed in
                           [(400, 0, 0), (400, 0, 1), (400, 1, 2)])
    det = LSGM(n_components=2 * k, mixture="dirichlet", transitions=transitions, max_iter=300).fit_outputs(train)
    y = np.r_[np.ones(len(id_test)), np.zeros(len(ood))]
    joint = torch.cat([det.score(None, id_test), det.score(None, ood)]).numpy()
    per_layer = [sum(det.layer_log_likelihoods(o).values()) for o in (id_test, ood)]
    assert roc_auc_score(y, joint) > 0.95
    assert abs(roc_auc_score(y, torch.cat(per_layer).numpy()) - 0.5) < 0.1
    det.joint = False  # the per-layer GMM baseline as a config would select it
    torch.testing.assert_close(det.score(None, ood), per_layer[1])


def test_transition_rows_normalised_and_smoothed() -> None:
    train = transition_traces(200, 3, 0, 0)
    for initial in ("weights", "counted"):
        det = LSGM(n_components=3, mixture="gmm", transition_smoothing=1.0, initial=initial).fit_outputs(train)
        (a,) = det.transition_matrices
        torch.testing.assert_close(a.sum(1), torch.ones(3, dtype=torch.float64))
        assert (a > 0).all()
        torch.testing.assert_close(det.log_init.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    (a,) = LSGM(n_components=3, mixture="gmm", transition_smoothing=0.0).fit_outputs(train).transition_matrices
    assert (a == 0).sum() == 6  # a clean diagonal: unseen moves are impossible without smoothing
    torch.testing.assert_close(a.sum(1), torch.ones(3, dtype=torch.float64))


def test_auto_components_min_weight_and_layer_selection() -> None:
    train = transition_traces(200, 2, 0, 0)  # 2 classes -> auto = 10 components
    det = LSGM(layers=["penultimate"], n_components="auto", mixture="gmm", max_iter=20).fit_outputs(train)
    assert det.layer_names == ["penultimate"] and det.models["penultimate"].n_components == 10
    dp = LSGM(n_components=10, min_weight=0.05, max_iter=300).fit_outputs(train)
    assert all(m.n_components < 10 for m in dp.models.values())  # the truncation's empty sticks are dropped
    assert torch.isfinite(dp.score(None, train)).all()
    with pytest.raises(ValueError, match="labels"):
        LSGM(n_components="auto").fit_outputs(make_outputs({"penultimate": np.zeros((4, 2))}))


def test_clear_errors() -> None:
    train = transition_traces(60, 2, 0, 0)
    with pytest.raises(RuntimeError, match="before fit"):
        LSGM().score(None, train)
    with pytest.raises(KeyError, match=r"block9.*available.*block1.*penultimate"):
        LSGM(layers=["block9"], n_components=2, mixture="gmm").fit_outputs(train)
    det = LSGM(n_components=2, mixture="gmm").fit_outputs(train)
    missing = make_outputs({"penultimate": train.layers["penultimate"].numpy()})
    with pytest.raises(KeyError, match=r"block1.*available.*penultimate"):
        det.score(None, missing)
    with pytest.raises(ValueError, match="mixture"):
        LSGM(mixture="kmeans")  # type: ignore[arg-type]


def test_scoring_time_rows() -> None:
    train, test = transition_traces(60, 2, 0, 0), transition_traces(20, 2, 0, 1)
    rows = scoring_time(train, test, n_components=(2, 3), repeats=1, mixture="gmm", max_iter=100)
    assert [(r["n_components"], r["n_layers"]) for r in rows] == [(2, 1), (2, 2), (3, 1), (3, 2)]
    assert all(r["n_inputs"] == 20 and r["seconds_per_input"] > 0 for r in rows)


def test_the_per_layer_ablation_reuses_lsgm_s_mixtures_on_the_same_outputs(monkeypatch):
    """method=lsgm fits LSGM and gmm_per_layer on one training pass: the mixtures are fitted once."""
    from ood_lightning.scoring.api import Outputs

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 3, generator=g), torch.randn(300, 2, generator=g)
    train = Outputs(logits=torch.zeros(300, 2), features=b, layers={"a": a, "penultimate": b}, labels=torch.arange(300) % 2)
    fits = []
    real = LSGM._fit_new_layer
    monkeypatch.setattr(LSGM, "_fit_new_layer", lambda self, *args: fits.append(args[0]) or real(self, *args))
    joint = LSGM(n_components=3, mixture="gmm", max_iter=20).fit_outputs(train)
    ablation = LSGM(n_components=3, mixture="gmm", max_iter=20, joint=False).fit_outputs(train)
    assert fits == ["a", "penultimate"]  # two layers, fitted once for both scorers
    other = LSGM(n_components=2, mixture="gmm", max_iter=20, joint=False).fit_outputs(train)  # other settings: refit
    assert fits == ["a", "penultimate", "a", "penultimate"]
    test = Outputs(logits=torch.zeros(5, 2), features=b[:5], layers={"a": a[:5], "penultimate": b[:5]})
    # the ablation equals the sum of the same per-layer mixtures' log-likelihoods
    expected = sum(torch.logsumexp(m.log_emissions(f) + m.log_weights, 1) for m, f in
                   zip(joint.models.values(), (a[:5], b[:5])))
    torch.testing.assert_close(ablation.score(None, test), expected)
    assert other.models["a"] is not joint.models["a"]


def brute_force_weighted(log_init: Tensor, log_trans: list[Tensor], log_em: list[Tensor],
                         log_weights: list[Tensor]) -> Tensor:
    """Eq. 4 enumerated: Σ_z P(z_1) P(x_1|z_1) Π_{i≥2} P(x_i|z_i) P(z_i|Φ_i) P(z_i|z_{i-1})."""
    sizes = [e.shape[1] for e in log_em]
    terms = []
    for trace in itertools.product(*(range(s) for s in sizes)):
        t = log_init[trace[0]] + log_em[0][:, trace[0]]
        for i in range(1, len(trace)):
            t = t + log_trans[i - 1][trace[i - 1], trace[i]] + log_em[i][:, trace[i]] + log_weights[i][trace[i]]
        terms.append(t)
    return torch.logsumexp(torch.stack(terms, 1), 1)


class _HandBuilt(LSGM):
    """An LSGM whose emissions, weights and transitions are set by hand (no mixture fit)."""

    def __init__(self, log_em: list[Tensor], log_weights: list[Tensor], log_trans: list[Tensor], **kwargs) -> None:
        super().__init__(**kwargs)
        self._em = log_em
        self.models = {f"l{i}": type("M", (), {"log_weights": w})() for i, w in enumerate(log_weights)}
        self.log_init, self.log_transitions = log_weights[0].clone(), log_trans

    def log_emissions(self, outputs: Outputs) -> dict[str, Tensor]:
        return dict(zip(self.models, self._em))


@pytest.mark.parametrize("sizes", [(2, 2, 2), (2, 3, 2), (3, 3, 3)])
def test_mixture_weight_options_match_enumeration(sizes: tuple[int, ...]) -> None:
    """Both readings of the paper, scored by LSGM.score, against all k^m state paths of a
    3-layer chain: §3.3 ("first_layer") and Eqs. 2/4 ("every_layer")."""
    g = torch.Generator().manual_seed(sum(sizes))
    log_em = [3 * torch.randn(5, s, generator=g, dtype=torch.float64) for s in sizes]
    log_w = [torch.log_softmax(2 * torch.randn(s, generator=g, dtype=torch.float64), 0) for s in sizes]
    log_a = [torch.log_softmax(2 * torch.randn(a, b, generator=g, dtype=torch.float64), 1)
             for a, b in zip(sizes, sizes[1:])]
    first = _HandBuilt(log_em, log_w, log_a, mixture_weights="first_layer").score(None, None)
    every = _HandBuilt(log_em, log_w, log_a, mixture_weights="every_layer").score(None, None)
    torch.testing.assert_close(first, brute_force(log_w[0], log_a, log_em))
    torch.testing.assert_close(every, brute_force_weighted(log_w[0], log_a, log_em, log_w))
    assert (first - every).abs().min() > 1e-3  # the two readings really differ here


def test_mixture_weight_options_on_a_fitted_model() -> None:
    """The same on a fitted LSGM: its own emissions, weights and transitions, enumerated."""
    train, test = transition_traces(300, 3, 1, 0), transition_traces(40, 3, 2, 1)
    first = LSGM(n_components=3, mixture="gmm", max_iter=50).fit_outputs(train)
    every = LSGM(n_components=3, mixture="gmm", max_iter=50, mixture_weights="every_layer").fit_outputs(train)
    em = list(every.log_emissions(test).values())
    weights = [m.log_weights for m in every.models.values()]
    torch.testing.assert_close(every.score(None, test), brute_force_weighted(every.log_init, every.log_transitions,
                                                                              em, weights))
    torch.testing.assert_close(first.score(None, test), brute_force(first.log_init, first.log_transitions, em))


def test_paper_components_by_number_of_classes() -> None:
    """n_components='paper': 50 / 100 / 200 for 10 / 100 / 200 classes (CIFAR-10 / CIFAR-100 /
    TinyImageNet), 50 otherwise; 'auto' stays 5 x classes."""
    for classes, k in [(10, 50), (100, 100), (200, 200), (6, 50)]:
        train = make_outputs({"penultimate": np.zeros((2 * classes, 2))}, labels=np.arange(2 * classes) % classes)
        assert LSGM(n_components="paper")._resolve_k(train) == k
        assert LSGM(n_components="auto")._resolve_k(train) == 5 * classes


def test_smoothing_per_row_keeps_sparse_peaked_rows_peaked() -> None:
    """Few samples, many components: 200 traces over k = 100 states, each state moving to one
    fixed next state (2 counts per row). Laplace 1 per cell makes the rows near-uniform
    (peak 3/102); one pseudo-count per row keeps them peaked (peak (2 + 1/100) / 3)."""
    k = 100
    j = np.arange(200) % k
    perm = np.random.default_rng(0).permutation(k)
    eye = np.eye(k)
    post_a, post_b = torch.log(torch.as_tensor(eye[j] + 1e-12)), torch.log(torch.as_tensor(eye[perm[j]] + 1e-12))
    peaks = {}
    for per in ("row", "cell"):
        det = LSGM(n_components=k, smoothing_per=per, transition_smoothing=1.0)
        a = det._log_normalise(det._counts(post_a, post_b)).exp()
        torch.testing.assert_close(a.sum(1), torch.ones(k, dtype=torch.float64))
        assert (a.argmax(1).numpy() == perm).all()
        peaks[per] = a.max(1).values.min().item()
        assert (a > 0).all()  # unseen moves stay possible either way
    assert peaks["row"] > 0.6 and peaks["cell"] < 0.05
    assert abs(peaks["row"] - (2 + 1 / k) / 3) < 1e-9 and abs(peaks["cell"] - 3 / (2 + k)) < 1e-9


def test_lsgm_preset_paper_defaults(tmp_path) -> None:
    """method=lsgm: the full training set, the paper's components, §3.3 recursion, row smoothing."""
    from tests.conftest import compose_cfg

    cfg = compose_cfg("train", ["method=lsgm", "data=cifar10"], tmp_path)
    assert cfg.evaluation.fit_limit is None
    for name in ("lsgm", "gmm_per_layer"):
        assert cfg.method.scorers[name].n_components == "paper"
    lsgm = cfg.method.scorers.lsgm
    assert lsgm.mixture_weights == "first_layer" and lsgm.smoothing_per == "row"
    for name in ("lsgm", "gmm_per_layer"):  # the paper's features: no standardisation, no PCA
        assert cfg.method.scorers[name].standardize is False and cfg.method.scorers[name].pca_dim is None
    assert LSGM().standardize is False and LSGM().pca_dim is None
