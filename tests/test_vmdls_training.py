"""VMDLS's training step and feature ensemble as the paper states them, and the presets' values
that carry its idea pinned against the paper's text and the authors' commands.

Truths: the step's loss recomputed here from the same seeded noise (a loop over triplets, the
KL from ``torch.distributions``); the ensemble's class means recomputed from the backbone's
block outputs averaged over space by hand; scipy's full-covariance Gaussian; the paper's and
the authors' README's numbers.
"""

from __future__ import annotations

import copy
import itertools
from functools import partial

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from scipy.stats import multivariate_normal
from torch import nn
from torch.distributions import Normal
from torch.utils.data import DataLoader, TensorDataset

from ood_lightning.methods.vmdls import VMDLS, ClassGaussians
from ood_lightning.nn.backbones import SmallCNN
from ood_lightning.scoring.passes import extract
from tests.conftest import compose_cfg

pytestmark = pytest.mark.usefixtures("single_thread")


def _model(**kw) -> VMDLS:
    torch.manual_seed(0)
    args = {"latent_dim": 4, "distance_margin_schedule": None, "kl_form": "monte_carlo", "kl_reduction": "mean",
            "kl_weight": 0.1, "autoencoder": None, **kw}
    return VMDLS(SmallCNN(1, (4, 4, 8), 8), 3, partial(torch.optim.SGD, lr=0.1), **args)


def _loop_losses(z: torch.Tensor, y: torch.Tensor, m_t: float, m_d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 2-3 averaged over every (anchor, positive, negative) of the batch, squared distances."""
    lt, ld = [], []
    for a, p, n in itertools.product(range(len(y)), repeat=3):
        if a != p and y[a] == y[p] and y[n] != y[a]:
            d_ap, d_an = (z[a] - z[p]).pow(2).sum(), (z[a] - z[n]).pow(2).sum()
            lt.append(torch.relu(m_t + d_ap - d_an))
            ld.append(torch.relu(m_d - d_an))
    return torch.stack(lt).mean(), torch.stack(ld).mean()


def _expected_loss(model: VMDLS, x: torch.Tensor, y: torch.Tensor, latent: str, seed: int) -> torch.Tensor:
    """The paper's loss of one epoch-0 batch on the stochastic z (``latent="z"``) or on μ: metric losses
    and the authors' one-sample KL log q(z) − log N(z; m(y), s²I) (mean over dimensions, × 0.1),
    m(y) the class means of this batch's z (epoch 0 has no previous epoch)."""
    with torch.no_grad():
        torch.manual_seed(seed)
        mu, logvar = model.latent(model.backbone(x))
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        v = z if latent == "z" else mu
        l_t, l_d = _loop_losses(v, y, model.triplet_margin, model.distance_margin)
        means = torch.stack([v[y == c].mean(0) for c in range(3)])[y]
        q = Normal(mu, (0.5 * logvar).exp())
        p = Normal(means, model.prior_var ** 0.5)
        kl = (q.log_prob(v) - p.log_prob(v)).mean(1).mean()
    return l_t + l_d + 0.1 * kl


def _run_step(model: VMDLS, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """The real ``training_step`` outside a Trainer: its optimiser, backward and logging stubbed."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.optimizers = lambda: [opt]
    model.manual_backward = lambda loss: loss.backward()
    model.log_dict = lambda *args, **kwargs: None
    torch.manual_seed(seed)
    return model.training_step((x, y), 0).detach()


def test_the_training_step_feeds_the_sampled_z_to_the_metric_losses_and_the_kl() -> None:
    """§3.1: "we measure our metric loss on the output of a *stochastic generator*, and not ... on
    deterministic representations" (the deterministic μ "rarely works well"). Seeded: the real step's
    loss equals the loss recomputed here on z = μ + σ·ε with the same ε, and differs from the μ-only one."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 1, 12, 12, generator=g), torch.arange(12) % 3
    model = _model()
    with torch.no_grad():  # σ large enough that z and μ give clearly different losses
        model.latent.logvar.bias.fill_(0.0)
    ref = copy.deepcopy(model)
    got = _run_step(model, x, y, seed=5)
    on_z = _expected_loss(ref, x, y, "z", seed=5)
    on_mu = _expected_loss(ref, x, y, "mu", seed=5)
    torch.testing.assert_close(got, on_z, rtol=1e-5, atol=1e-5)
    assert abs(float(on_z - on_mu)) > 0.1 * abs(float(on_z)), (float(on_z), float(on_mu))


def test_the_ensemble_is_the_average_pooled_blocks_g_and_mu_in_the_papers_order() -> None:
    """§3.1 Eq. 8: t = (t¹, t², t³, g, μ(g)), "the outputs (after performing average pooling) of 3
    different layers"; one anisotropic Gaussian per class on t. Through the real evaluation pass
    (``scoring.passes.extract``), the fitted class means equal the class means of t built here from the
    backbone's block outputs averaged over space by hand."""
    model = _model().eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(60, 1, 12, 12, generator=g), torch.arange(60) % 3
    outputs = extract(model, DataLoader(TensorDataset(x, y), batch_size=20), lambda v: v, "cpu")
    model.fit_class_gaussians(outputs)
    ((names, gauss),) = model._gaussians["vmdls_b"]
    assert names == ["block1", "block2", "block3", "penultimate", "mu"]
    with torch.no_grad():
        f = model.backbone.forward_features(x)
        t = torch.cat([f["block1"].mean((2, 3)), f["block2"].mean((2, 3)), f["block3"].mean((2, 3)), f["penultimate"],
                       model.latent.mu(f["penultimate"])], 1).double()
    expected = torch.stack([t[y == c].mean(0) for c in range(3)])
    torch.testing.assert_close(gauss.means, expected, rtol=1e-5, atol=1e-6)


def test_the_preset_class_gaussians_are_close_to_the_full_ml_covariance(tmp_path) -> None:
    """§3.1: "for each class c, we fit a multivariate *anisotropic* Gaussian" (the authors' code: the full
    sample covariance plus a 1e-6 ridge). The preset's small shrinkage towards the diagonal keeps the
    log-likelihoods of correlated features within 0.02 nats (mean) of scipy's full-covariance Gaussian."""
    shrinkage = compose_cfg("train", ["method=vmdls"], tmp_path).method.shrinkage
    rng = np.random.default_rng(0)
    cov = 0.5 * np.eye(4) + 0.5 * np.ones((4, 4))  # correlation 0.5 between every pair
    x = rng.multivariate_normal(np.zeros(4), cov, size=4000)
    test = rng.multivariate_normal(np.zeros(4), cov, size=500)
    gauss = ClassGaussians(shrinkage).fit(torch.from_numpy(x), torch.zeros(len(x), dtype=torch.long))
    ours = gauss.log_likelihood(torch.from_numpy(test))[:, 0].numpy()
    truth = multivariate_normal(x.mean(0), np.cov(x.T, bias=True)).logpdf(test)
    assert np.abs(ours - truth).mean() < 0.02


# -- presets, pinned against the paper's text and the authors' commands ------------------------------
def test_vmdls_preset_values_are_the_papers(tmp_path) -> None:
    """Dinari & Freifeld §3.1: "the presence of the L_d term lets us fix the value of M_t ... to
    M_t = 0.1 in all our experiments"; "As for the value of M_d, we usually use M_d = d"; "we use
    s² = 0.1 in all classes and in all our experiments"; Eq. 8 t = (t¹, t², t³, g, μ); the authors'
    commands: --latent_dim 32, --kl_coeff 0.1, --margin_jump 1.0."""
    m = compose_cfg("train", ["method=vmdls"], tmp_path).method
    assert m.triplet_margin == 0.1
    assert m.distance_margin is None and m.latent_dim == 32  # M_d = d = 32
    assert m.prior_var == 0.1
    assert list(m.layers) == ["block1", "block2", "block3", "penultimate", "mu"]
    assert (m.kl_weight, m.distance_margin_schedule.step) == (0.1, 1.0)
    assert m.triplet_weight == m.distance_weight == 1.0  # Eq. 7: L_KL + L_t + L_d, unweighted
    assert m.reconstruction_layer == "block1"  # §3.3: "t¹ and t̂¹ denote the first features"


def _lrs(cfg, epochs: int) -> list[float]:
    opt = instantiate(cfg.method.optimizer)([nn.Parameter(torch.zeros(1))])
    sched = instantiate(cfg.method.scheduler)(opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cifar10_recipe_is_the_authors_resnet18_command(tmp_path) -> None:
    """BGU-CS-VIL/vmdls README, CIFAR-10 with ResNet18: ``--max_epochs 500 --lr 0.01 --step_size 100
    --opt sgd --batch_classes 10 --margins_epoch 10 --margin_max_distance 32 --kl_coeff 0.1
    --generation_epoch 0`` (their SGD: Nesterov, momentum 0.9, weight decay 1e-4)."""
    cfg = compose_cfg("train", ["experiment=vmdls_cifar10", "trainer=cpu"], tmp_path)
    assert cfg.trainer.max_epochs == 500
    opt = instantiate(cfg.method.optimizer)([nn.Parameter(torch.zeros(1))])
    group = opt.param_groups[0]
    assert type(opt) is torch.optim.SGD
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.01, 0.9, True, 1e-4)
    assert _lrs(cfg, 500) == pytest.approx([0.01 * 0.1 ** (e // 100) for e in range(500)], rel=1e-12)
    m = cfg.method
    assert (m.classes_per_batch, m.distance_margin_schedule.from_epoch, m.kl_start_epoch) == (10, 10, 0)


def test_mnist_recipe_is_the_authors_mnist_command(tmp_path) -> None:
    """BGU-CS-VIL/vmdls README, MNIST: ``--max_epochs 500 --lr 0.0001 --opt adam --step_size 100
    --margins_epoch 1 --batch_classes 10 --kl_coeff 0.1 --generation_epoch 0``."""
    cfg = compose_cfg("train", ["experiment=vmdls_mnist"], tmp_path)
    assert cfg.trainer.max_epochs == 500
    opt = instantiate(cfg.method.optimizer)([nn.Parameter(torch.zeros(1))])
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["lr"] == 1e-4
    assert _lrs(cfg, 500) == pytest.approx([1e-4 * 0.1 ** (e // 100) for e in range(500)], rel=1e-12)
    m = cfg.method
    assert (m.distance_margin_schedule.start, m.distance_margin_schedule.from_epoch) == (0.15, 1)
    assert (m.kl_form, m.kl_reduction, m.kl_weight, m.kl_start_epoch) == ("monte_carlo", "mean", 0.1, 0)
    assert m.classes_per_batch == 10
