"""Latent flows (LDE) against independent truths: scipy's normal density, the exact change of
variables via autograd Jacobians, scikit-learn's PCA and AUROC."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from nflows.transforms import IdentityTransform
from scipy.stats import norm
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torch.func import jacrev

from ood_lightning.core.errors import ConfigError
from ood_lightning.methods.lde.latent_flow import LatentFlowDetector, build_flow
from ood_lightning.nn.flows.coupling import NflowsFlow, glow, maf, realnvp
from ood_lightning.nn.flows.residual import ResidualFlow
from ood_lightning.scoring.api import FitData, Outputs, Scorer

EPS = 1 / 1024


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: extra intra-op threads only add contention on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def as_outputs(features: Tensor) -> Outputs:
    return Outputs(logits=torch.zeros(len(features), 2), features=features)


def mixture(n: int, centers: Tensor, seed: int, scale: float = 0.3) -> Tensor:
    """n points from an equal-weight Gaussian mixture around ``centers`` [K, D]."""
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(len(centers), (n,), generator=g)
    return centers[which] + scale * torch.randn(n, centers.shape[1], generator=g)


def identity_flow(dim: int) -> NflowsFlow:
    return NflowsFlow.standard_normal(IdentityTransform(), dim)


@pytest.mark.parametrize("normalize", ["none", "l2"])
def test_identity_flow_bpd_matches_closed_form(normalize):
    x = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    det = LatentFlowDetector(flow=identity_flow, normalize=normalize, epsilon=EPS, device="cpu").fit(None, FitData(as_outputs(x)))
    z = x.numpy() / (np.linalg.norm(x.numpy(), axis=1, keepdims=True) if normalize == "l2" else 1.0)
    expected = -norm.logpdf(z).sum(1) / math.log(2) / 6 - math.log2(EPS)
    np.testing.assert_allclose(det.bpd(x).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(det.score(None, as_outputs(x)).numpy(), -expected, rtol=1e-5)
    assert isinstance(det, Scorer) and det.dim == 6


@pytest.mark.parametrize("builder", [glow, realnvp, maf])
def test_log_prob_is_exact_change_of_variables(builder):
    torch.manual_seed(0)
    flow = builder(3, n_blocks=2, hidden=8).double()
    flow.train()
    flow.log_prob(torch.randn(64, 3, dtype=torch.float64))  # data-dependent inits, batch-norm running stats
    with torch.no_grad():  # move every parameter off its (near-identity) initialisation
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    flow.eval()

    x = torch.randn(5, 3, dtype=torch.float64)
    expected = []
    for xi in x:
        f = lambda v: flow(v[None])[0][0]  # noqa: E731
        z, jac = f(xi), jacrev(f)(xi)
        expected.append(norm.logpdf(z.detach().numpy()).sum() + torch.linalg.slogdet(jac)[1].item())
    np.testing.assert_allclose(flow.log_prob(x).detach().numpy(), expected, rtol=1e-8, atol=1e-8)
    z, logdet = flow(x)
    assert z.shape == (5, 3) and logdet.shape == (5,)


def test_ranks_shifted_mixture_as_ood():
    centers = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)) * 2
    shifted = torch.randn(3, 16, generator=torch.Generator().manual_seed(2)) * 2
    train, test, ood = mixture(1000, centers, 3), mixture(300, centers, 4), mixture(300, shifted, 5)
    y = np.r_[np.ones(300), np.zeros(300)]

    def auroc(epochs: int) -> float:
        det = LatentFlowDetector(flow="glow", n_blocks=4, hidden=32, epochs=epochs, device="cpu")
        det.fit(None, FitData(as_outputs(train)))
        s_id, s_ood = det.score(None, as_outputs(test)), det.score(None, as_outputs(ood))
        assert s_id.shape == (300,) and torch.isfinite(s_id).all()
        return roc_auc_score(y, torch.cat([s_id, s_ood]).numpy())

    # untrained, the flow is the identity and every unit-norm point has the same density
    assert auroc(epochs=0) == pytest.approx(0.5)
    assert auroc(epochs=1) > 0.9  # the paper's recipe: one epoch at lr 1e-4


class Spy(nn.Module):
    """Wraps a flow and keeps every batch it is asked to model."""

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow, self.seen = flow, []

    def log_prob(self, h: Tensor) -> Tensor:
        self.seen.append(h.detach().clone())
        return self.flow.log_prob(h)


def test_flow_sees_pca_reduced_unit_norm_features():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 16) + 1
    spies = []
    factory = lambda d: spies.append(Spy(glow(d, n_blocks=2, hidden=16))) or spies[-1]  # noqa: E731
    det = LatentFlowDetector(flow=factory, pca_dim=5, epsilon=EPS, batch_size=64, device="cpu").fit(None, FitData(as_outputs(x)))
    seen = torch.cat(spies[0].seen)
    assert seen.shape[1] == 5 and det.dim == 5
    # training batches carry U(-ε/2, ε/2) noise per coordinate on top of unit-norm points
    assert (seen.norm(dim=1) - 1).abs().max() <= EPS / 2 * math.sqrt(5) + 1e-6
    assert (seen.norm(dim=1) - 1).abs().max() > 0
    assert torch.allclose(det.prepare(x).norm(dim=1), torch.ones(300), atol=1e-6)
    raw = LatentFlowDetector(flow=factory, pca_dim=5, normalize="none", epochs=0, device="cpu").fit(None, FitData(as_outputs(x)))
    np.testing.assert_allclose(raw.prepare(x).numpy(), PCA(5).fit(x.double().numpy()).transform(x.numpy()), atol=1e-4)


def test_history_records_auroc_and_bpd_per_set():
    centers = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)) * 2
    train, test, ood = mixture(640, centers, 3), mixture(100, centers, 4), mixture(100, centers + 3, 5)
    det = LatentFlowDetector(flow="maf", n_blocks=2, hidden=32, lr=1e-3, epochs=2, batch_size=64, eval_every=4,
                             device="cpu")
    det.fit_with_history(None, as_outputs(train), eval_sets={"id": test, "shifted": ood})
    assert [row["step"] for row in det.history] == [0, 4, 8, 12, 16, 20]
    last = det.history[-1]
    assert set(last) == {"step", "epoch", "train_bpd", "bpd/id", "bpd/shifted", "auroc/shifted"}
    y = np.r_[np.ones(100), np.zeros(100)]
    scores = torch.cat([det.score(None, as_outputs(test)), det.score(None, as_outputs(ood))])
    assert last["auroc/shifted"] == pytest.approx(roc_auc_score(y, scores.numpy()))
    assert last["bpd/id"] == pytest.approx(det.bpd(test).mean().item())


def test_seeded_fits_are_reproducible():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    fit = lambda: LatentFlowDetector(flow="realnvp", n_blocks=2, hidden=8, batch_size=32, device="cpu").fit(  # noqa: E731
        None, FitData(as_outputs(x)))
    assert torch.equal(fit().bpd(x), fit().bpd(x))


def test_unknown_flow_is_a_clear_config_error():
    with pytest.raises(ConfigError, match=r"unknown flow 'nope'; choose one of .*glow.*residual"):
        build_flow(4, "nope")


def test_residual_flow_plugs_in():
    """flow=residual: bpd = -(log N(z; 0, I) + log|det ∂z/∂h|) / (d ln 2) - log2 ε, the log-det from the
    full autograd Jacobian of the fitted flow on the L2-normalised features."""
    x = torch.randn(128, 4, generator=torch.Generator().manual_seed(0)) * 2 + 1
    det = LatentFlowDetector(flow="residual", n_blocks=2, hidden=16, batch_size=64, lr=1e-2, epochs=5, epsilon=EPS,
                             device="cpu").fit(None, FitData(as_outputs(x)))
    assert isinstance(det.flow, ResidualFlow) and det.dim == 4
    flow = copy.deepcopy(det.flow).double().eval()
    h = x.double() / x.double().norm(dim=1, keepdim=True)
    expected, logdets = [], []
    for hi in h[:16]:
        f = lambda v: flow(v[None])[0][0]  # noqa: E731
        with torch.no_grad():
            z = f(hi)
        logdet = torch.linalg.slogdet(jacrev(f)(hi))[1].item()
        logdets.append(logdet)
        expected.append(-(norm.logpdf(z.numpy()).sum() + logdet) / (4 * math.log(2)) - math.log2(EPS))
    assert min(logdets) > 0.3  # fitted to points on the sphere, the flow is far from volume-preserving
    np.testing.assert_allclose(det.bpd(x[:16]).numpy(), expected, rtol=1e-5)


class NoiseSpy(nn.Module):
    """A standard-normal 'flow' with one dummy parameter (so the fit loop runs) that keeps
    every training batch: on all-zero features a batch *is* the dequantisation noise."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.flow, self.dummy, self.seen = identity_flow(dim), nn.Parameter(torch.zeros(())), []

    def log_prob(self, h: Tensor) -> Tensor:
        self.seen.append(h.detach().clone())
        return self.flow.log_prob(h) + 0 * self.dummy


def test_dequantisation_noise_is_uniform_of_one_bin_centred():
    """Pins U(−ε/2, ε/2), ε = 1/1024 (the paper's): a U(0, ε) fails the mean, a N(0, ε) the
    variance and the range, a U(−ε, ε) the variance and the range."""
    spies = []
    det = LatentFlowDetector(flow=lambda d: spies.append(NoiseSpy(d)) or spies[-1], normalize="none",
                             batch_size=512, device="cpu")
    assert det.epsilon == EPS
    det.fit(None, FitData(as_outputs(torch.zeros(8192, 8))))
    u = torch.cat(spies[0].seen).double().flatten() / EPS  # 65,536 draws in bin units, should be U(-1/2, 1/2)
    assert len(u) == 8192 * 8
    se_mean = math.sqrt(1 / 12 / len(u))  # ≈ 0.0011
    assert abs(u.mean().item()) < 5 * se_mean
    assert abs(u.var().item() - 1 / 12) < 0.003  # sd of the sample variance ≈ 0.0003
    assert u.min().item() >= -0.5 and u.max().item() <= 0.5
    assert u.min().item() < -0.499 and u.max().item() > 0.499  # fills the whole bin


@pytest.mark.parametrize("n", [256, 300, 1000])
def test_fit_log_states_samples_and_steps(n, caplog):
    """The log line's step count is the number of optimiser steps taken, ceil(n / batch)."""
    spies = []
    det = LatentFlowDetector(flow=lambda d: spies.append(NoiseSpy(d)) or spies[-1], batch_size=64, device="cpu")
    with caplog.at_level("INFO", logger="ood_lightning.methods.lde.latent_flow"):
        det.fit(None, FitData(as_outputs(torch.randn(n, 4, generator=torch.Generator().manual_seed(n)))))
    (line,) = [r.getMessage() for r in caplog.records if "latent flow fit" in r.getMessage()]
    steps = math.ceil(n / 64)
    assert f"{n} samples, {steps} steps" in line, line
    assert len(spies[0].seen) == steps  # one log_prob call per training step


def test_lde_preset_fits_one_full_augmented_epoch(tmp_path):
    """method=lde resolves to the paper's fit data (§4, §6.2): the whole ID training split,
    augmented for the flows (the baselines beside them fit on the plain split), one epoch of
    batch 128 (352 steps on CIFAR-10's 45k)."""
    from tests.conftest import compose_cfg

    cfg = compose_cfg("train", ["method=lde", "data=cifar10"], tmp_path)
    assert cfg.evaluation.fit_limit is None and cfg.method.fit.fit_augmented is True
    assert cfg.evaluation.fit_augmented is False
    assert cfg.method.fit.epochs == 1 and cfg.method.fit.batch_size == 128 and cfg.method.fit.epsilon == EPS
    # the rest of the config still overrides it (debug / command line come later)
    cfg = compose_cfg("train", ["method=lde", "method/flow=realnvp", "evaluation.fit_limit=100"], tmp_path)
    assert cfg.evaluation.fit_limit == 100 and cfg.method.flow.name == "realnvp"
