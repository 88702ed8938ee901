"""Our torch EM (LSGM ``backend="torch"``) against scikit-learn's GaussianMixture: from the same
start, the same iterations give the same parameters and log-likelihood."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors.lsgm import LSGM
from ood_lightning.detectors.torch_gmm import TorchGaussianMixture
from tests.test_lsgm import transition_traces


def mixture_data(n: int = 300, seed: int = 0) -> np.ndarray:
    """Three overlapping, correlated 3-D Gaussians with offset means (raw, unstandardised scale)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 10.0], [3.0, 1.0, 12.0], [-2.0, 3.0, 9.0]])
    mix = rng.standard_normal((3, 3, 3))
    j = rng.integers(0, 3, n)
    return centres[j] + np.einsum("nd,nde->ne", rng.standard_normal((n, 3)), mix[j])


def assert_same_fit(ours: TorchGaussianMixture, ref: GaussianMixture, x: np.ndarray, rtol: float) -> None:
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(ref, name), rtol=rtol, atol=rtol, err_msg=name)
    np.testing.assert_allclose(ours.score_samples(x), ref.score_samples(x), rtol=rtol)
    assert ours.score(x) == pytest.approx(ref.score(x), rel=rtol)
    assert ours.lower_bound_ == pytest.approx(ref.lower_bound_, rel=rtol)
    assert (ours.n_iter_, ours.converged_) == (ref.n_iter_, ref.converged_)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("iterations", [1, 4])
def test_torch_em_from_the_same_start_equals_sklearn(iterations: int) -> None:
    x = mixture_data()
    init = {"weights_init": np.array([0.2, 0.3, 0.5]),
            "means_init": np.array([[1.0, 0.0, 10.0], [2.0, 2.0, 11.0], [-1.0, 2.0, 9.0]]),
            "precisions_init": np.stack([np.eye(3) * s for s in (0.5, 1.0, 2.0)])}
    common = {"n_components": 3, "reg_covar": 1e-4, "max_iter": iterations, "tol": 0.0}
    ref = GaussianMixture(covariance_type="full", **common, **init).fit(x)
    before = x.copy()
    ours = TorchGaussianMixture(**common, **init, chunk_elements=3 * 3 * 7).fit(x)  # chunks of 7 samples
    np.testing.assert_array_equal(x, before)  # the data are not shifted in place
    assert_same_fit(ours, ref, x, rtol=1e-10)


def test_torch_em_with_sklearns_kmeans_start_converges_like_sklearn() -> None:
    x = mixture_data(400, seed=1)
    ref = GaussianMixture(4, covariance_type="full", reg_covar=1e-6, max_iter=200, tol=1e-3, random_state=3).fit(x)
    ours = TorchGaussianMixture(4, reg_covar=1e-6, max_iter=200, tol=1e-3, random_state=3).fit(x)
    assert ref.converged_ and ref.n_iter_ > 2
    assert_same_fit(ours, ref, x, rtol=1e-8)


@pytest.mark.parametrize("standardize,pca_dim", [(True, 1), (False, None)])
def test_lsgm_torch_backend_scores_as_the_sklearn_backend(standardize: bool, pca_dim: int | None) -> None:
    train, test = transition_traces(240, 3, 1, seed=0), transition_traces(60, 3, 2, seed=1)
    kwargs = {"n_components": 3, "mixture": "gmm", "standardize": standardize, "pca_dim": pca_dim, "seed": 0}
    ref = LSGM(**kwargs).fit_outputs(train).score(None, test)  # type: ignore[arg-type]
    det = LSGM(backend="torch", **kwargs).fit(torch.nn.Linear(2, 2), _fit_data(train))
    assert det.fit_device == torch.device("cpu")
    torch.testing.assert_close(det.score(None, test), ref, rtol=1e-8, atol=1e-8)  # type: ignore[arg-type]


def _fit_data(train):
    from ood_lightning.scoring.api import FitData

    return FitData(train=train)


def test_torch_backend_refuses_what_it_does_not_fit() -> None:
    for kwargs in ({"mixture": "dirichlet"}, {"mixture": "gmm", "covariance_type": "diag"},
                   {"mixture": "gmm", "mixture_kwargs": {"n_init": 3}}):
        with pytest.raises(ConfigError, match="backend=torch"):
            LSGM(backend="torch", **kwargs)
    with pytest.raises(ConfigError, match="backend"):
        LSGM(backend="jax")
    with pytest.raises(ConfigError, match="all of weights_init"):
        TorchGaussianMixture(2, means_init=np.zeros((2, 3))).fit(mixture_data())


def test_the_papers_features_and_the_torch_em_are_reachable_from_the_preset(tmp_path) -> None:
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    keys = "method.scorers.lsgm"
    cfg = compose_cfg("train", ["method=lsgm", "data=cifar10", f"{keys}.mixture=gmm", f"{keys}.backend=torch",
                                f"{keys}.standardize=false", f"{keys}.pca_dim=null"], tmp_path)
    det = instantiate(cfg.method.scorers.lsgm)
    assert (det.backend, det.mixture, det.standardize, det.pca_dim) == ("torch", "gmm", False, None)
    assert cfg.method.scorers.gmm_per_layer.backend == "sklearn"  # the default stays scikit-learn's
