"""VMDLS: vectorised losses against brute force, the KL against torch.distributions, the class
batch sampler (shape, seeding, DDP shards, Lightning's sampler injection), the class Gaussians,
the reconstruction weighting, and tiny end-to-end runs through train()."""

from __future__ import annotations

import itertools
import json
import math
from functools import partial

import numpy as np
import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import ood_lightning.methods.vmdls as vmdls_module
from ood_lightning.core.errors import ConfigError
from ood_lightning.data.class_batch_sampler import ClassBatchSampler
from ood_lightning.methods.vmdls import (
    VMDLS,
    ClassGaussians,
    ConvAutoencoder,
    class_kl,
    reconstruction_weighted,
    triplet_losses,
)
from ood_lightning.nn.backbones import SmallCNN
from ood_lightning.scoring.api import FitData, Outputs
from tests.conftest import TINY, check_reported_metrics, compose_cfg

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------- losses
def _brute_force(z, y, m_t, m_d):
    lt, ld = [], []
    for a, p, n in itertools.product(range(len(y)), repeat=3):
        if a != p and y[a] == y[p] and y[n] != y[a]:
            d_ap, d_an = (z[a] - z[p]).pow(2).sum(), (z[a] - z[n]).pow(2).sum()
            lt.append(torch.relu(d_ap - d_an + m_t))
            ld.append(torch.relu(m_d - d_an))
    return torch.stack(lt).mean(), torch.stack(ld).mean()


@pytest.mark.parametrize("seed,chunk", [(0, 1 << 24), (1, 1 << 24), (0, 3 * 14 * 14)])
def test_vectorised_triplet_and_distancing_equal_a_loop_over_triplets(seed, chunk, monkeypatch):
    monkeypatch.setattr(vmdls_module, "_TRIPLET_CHUNK", chunk)  # 3 * 14 * 14: five blocks of anchors
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(14, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (14,), generator=gen)
    lt, ld = triplet_losses(z, y, 0.1, 4.0)
    bt, bd = _brute_force(z, y, 0.1, 4.0)
    torch.testing.assert_close(lt, bt)
    torch.testing.assert_close(ld, bd)
    g1 = torch.autograd.grad(lt + 0.5 * ld, z)[0]
    g2 = torch.autograd.grad(bt + 0.5 * bd, z)[0]
    torch.testing.assert_close(g1, g2)


def test_no_valid_triplet_gives_zero_with_a_graph():
    z = torch.randn(3, 2, requires_grad=True)
    lt, ld = triplet_losses(z, torch.tensor([0, 1, 2]), 0.1, 2.0)  # no positives
    assert float(lt.detach()) == 0 and float(ld.detach()) == 0 and lt.requires_grad


def test_kl_equals_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mu, logvar, means = (torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    p = Independent(Normal(means, torch.full_like(means, 0.1).sqrt()), 1)
    torch.testing.assert_close(class_kl(mu, logvar, means, 0.1), kl_divergence(q, p).mean())


def test_monte_carlo_kl_is_log_q_minus_log_p_and_estimates_the_analytic_kl():
    gen = torch.Generator().manual_seed(0)
    mu, logvar, means = (torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    z = mu + (0.5 * logvar).exp() * torch.randn(4, 3, generator=gen, dtype=torch.float64)
    per_dim = Normal(mu, (0.5 * logvar).exp()).log_prob(z) - Normal(means, math.sqrt(0.1)).log_prob(z)
    torch.testing.assert_close(vmdls_module.class_kl_monte_carlo(z, mu, logvar, means, 0.1), per_dim.sum(1).mean())
    torch.testing.assert_close(vmdls_module.class_kl_monte_carlo(z, mu, logvar, means, 0.1, "mean"),
                               per_dim.mean(1).mean())
    n = 200000  # unbiased: many draws of one (μ, σ) average to the closed form
    big = [t[:1].expand(n, 3) for t in (mu, logvar, means)]
    zs = big[0] + (0.5 * big[1]).exp() * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    mc = vmdls_module.class_kl_monte_carlo(zs, *big, 0.1)
    assert float(mc) == pytest.approx(float(class_kl(*big, 0.1)), rel=0.02)
    with pytest.raises(ConfigError, match="kl_form"):
        VMDLS(SmallCNN(1, (4, 4, 8), 8), 3, None, kl_form="mc")


def test_kl_targets_are_running_means_in_epoch_0_then_the_previous_epochs():
    model = VMDLS(SmallCNN(1, (4, 4, 8), 8), 3, None, latent_dim=2)
    z, y = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 0, 2])
    model._z_sum[0] = torch.tensor([2.0, 2.0])  # one earlier z of class 0 this epoch
    model._z_count[0] = 1
    targets = model.kl_targets(z, y)
    torch.testing.assert_close(targets[0], torch.tensor([2.0, 2.0 / 3]))
    torch.testing.assert_close(targets[2], torch.tensor([0.0, 5.0]))
    model.head.means[0], model.head.seen[0] = torch.tensor([9.0, 9.0]), True
    torch.testing.assert_close(model.kl_targets(z, y)[0], torch.tensor([9.0, 9.0]))


def test_stochastic_head_samples_n_mu_sigma2_reparameterised():
    """z ~ N(μ, σ²) with gradients into both; the deterministic z = μ (the paper's failing variant) fails this."""
    torch.manual_seed(0)
    mu = torch.tensor([[1.0, -2.0]]).repeat(20000, 1)
    logvar = torch.tensor([[0.0, math.log(0.25)]]).repeat(20000, 1).requires_grad_(True)
    z = vmdls_module.StochasticHead.sample(mu, logvar)
    torch.testing.assert_close(z.mean(0), torch.tensor([1.0, -2.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(z.var(0), torch.tensor([1.0, 0.25]), atol=0.03, rtol=0)
    z.pow(2).sum().backward()
    assert logvar.grad.abs().sum() > 0


def test_epoch_end_stores_the_class_means_of_the_epochs_z(tmp_path):
    """A real (tiny) Lightning epoch: head.means = mean of the z sampled for each class, not their sum."""
    import lightning as L

    torch.manual_seed(0)
    x = torch.randn(24, 1, 12, 12)
    y = torch.arange(24) % 3
    model = VMDLS(SmallCNN(1, (4, 4, 8), 8), 3, partial(torch.optim.SGD, lr=0.0), latent_dim=2)
    drawn = []
    sample = model.latent.sample

    def recording(mu, logvar):
        z = sample(mu, logvar)
        drawn.append(z.detach().clone())
        return z

    model.latent.sample = recording
    loader = DataLoader(TensorDataset(x, y), batch_size=12, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, loader)
    z = torch.cat(drawn)
    assert len(z) == 24
    expected = torch.stack([z[y == c].mean(0) for c in range(3)])
    torch.testing.assert_close(model.head.means, expected)
    assert bool(model.head.seen.all())


def test_vmdls_score_is_the_paper_weighting_with_w_and_m_computed_independently():
    """vmdls = ℓ − (w − 1)·max(M − ℓ, 0) with w = ‖t¹(x) − t¹(x̂)‖² over its ID-train mean and M = max ID-train ℓ
    + margin, each recomputed here from the backbone and the autoencoder. Fails on w = ‖g(x)‖², on 1/w and on
    M offset by a constant."""
    torch.manual_seed(0)
    model = VMDLS(SmallCNN(1, (4, 4, 8), 8), 3, None, latent_dim=2, autoencoder=ConvAutoencoder(1, (4, 4), 2),
                  autoencoder_optimizer=torch.optim.Adam, reference_margin=1.0).eval()
    train, x_train = _toy_outputs(model)
    test, x_test = _toy_outputs(model, 30)
    model.fit_class_gaussians(train)
    scores = model.own_scores(test)

    def w_raw(x):
        with torch.no_grad():
            t1 = model.backbone.forward_features(x)["block1"].mean((2, 3))
            t1_hat = model.backbone.forward_features(model.autoencoder(x))["block1"].mean((2, 3))
        return (t1 - t1_hat).pow(2).sum(1).double()

    w = w_raw(x_test) / w_raw(x_train).mean()
    assert w.min() < 0.9 and w.max() > 1.1  # both sides of 1: 1/w and w differ
    reference = float(model.own_scores(train)["vmdls_b"].max()) + 1.0
    ll = scores["vmdls_b"]
    assert (ll < reference).all()  # every test input below M: the weighting acts on all of them
    torch.testing.assert_close(scores["vmdls"], reference + w * (ll - reference), rtol=1e-5, atol=1e-4)


def test_distance_margin_schedule_is_the_authors_ramp():
    """Their UpdateMargin: 0.15 until epoch 9, +1 at each epoch start from 10 while M_d <= d (d = 32)."""
    model = VMDLS(SmallCNN(1, (4, 4, 8), 8), 3, None, latent_dim=32,
                  distance_margin_schedule={"start": 0.15, "step": 1.0, "from_epoch": 10})
    expected = {0: 0.15, 9: 0.15, 10: 1.15, 11: 2.15, 20: 11.15, 40: 31.15, 41: 32.15, 42: 32.15, 500: 32.15}
    for epoch, margin in expected.items():
        assert model.distance_margin_at(epoch) == pytest.approx(margin), epoch
    fixed = VMDLS(SmallCNN(1, (4, 4, 8), 8), 3, None, latent_dim=32, distance_margin_schedule=None)
    assert [fixed.distance_margin_at(e) for e in (0, 10, 50)] == [32.0, 32.0, 32.0]
    with pytest.raises(ConfigError, match="distance_margin_schedule"):
        VMDLS(SmallCNN(1, (4, 4, 8), 8), 3, None, distance_margin_schedule={"start": 0.15})


def test_the_loss_uses_the_scheduled_margin(monkeypatch):
    model = VMDLS(SmallCNN(1, (4, 4, 8), 8), 3, None, latent_dim=2,
                  distance_margin_schedule={"start": 0.15, "step": 1.0, "from_epoch": 1})
    z, y = torch.tensor([[0.0, 0.0], [0.0, 0.1], [1.0, 0.0], [1.0, 0.1]]), torch.tensor([0, 0, 1, 1])
    for epoch, margin in ((0, 0.15), (1, 1.15), (5, 2.15)):
        monkeypatch.setattr(VMDLS, "current_epoch", property(lambda self, e=epoch: e))
        l_d = model.loss_terms(z, z, torch.zeros_like(z), y)["distance"]
        torch.testing.assert_close(l_d, triplet_losses(z, y, 0.1, margin)[1])


def test_presets_carry_the_authors_margin_ramp(tmp_path):
    cfg = compose_cfg("train", ["experiment=vmdls_cifar10"], tmp_path)
    assert dict(cfg.method.distance_margin_schedule) == {"start": 0.15, "step": 1.0, "from_epoch": 10}
    cfg = compose_cfg("train", ["experiment=vmdls_mnist",
                                "method.distance_margin_schedule={start:0.15,step:1.0,from_epoch:10}"], tmp_path)
    assert cfg.method.distance_margin_schedule.from_epoch == 10


# ---------------------------------------------------------------------------------- sampler
def _labels():
    return torch.arange(5).repeat_interleave(30)[torch.randperm(150, generator=torch.Generator().manual_seed(0))]


def test_sampler_yields_exactly_bc_classes_times_bn_examples():
    labels = _labels()
    sampler = ClassBatchSampler(labels, classes_per_batch=3, samples_per_class=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 150 // 12
    for batch in batches:
        assert len(batch) == 12 and len(set(batch)) == 12
        counts = torch.bincount(labels[batch], minlength=5)
        assert sorted(counts[counts > 0].tolist()) == [4, 4, 4]
    sampler.set_epoch(0)
    assert list(sampler) == batches  # seeded: epoch 0 again
    assert list(ClassBatchSampler(labels, 3, 4, seed=1)) == batches
    assert list(sampler) != batches  # the next epoch differs


def test_sampler_shards_by_rank():
    labels = _labels()
    full = list(ClassBatchSampler(labels, 2, 3, num_batches=8, seed=0, num_replicas=1, rank=0))
    shards = [list(ClassBatchSampler(labels, 2, 3, num_batches=4, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert shards[0] == full[0::2] and shards[1] == full[1::2]
    # Lightning under DDP re-creates the batch sampler with a DistributedSampler: its rank is used
    ds = TensorDataset(torch.zeros(150), labels)
    injected = ClassBatchSampler(labels, 2, 3, seed=0, sampler=DistributedSampler(ds, num_replicas=2, rank=1))
    assert (injected.num_replicas, injected.rank, len(injected)) == (2, 1, 150 // 12)


def test_lightning_can_inject_its_distributed_sampler():
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler

    labels = _labels()
    ds = TensorDataset(torch.arange(150), labels)
    with _replace_dunder_methods(BatchSampler):
        loader = DataLoader(ds, batch_sampler=ClassBatchSampler(labels, 2, 3, seed=0))
    new = _update_dataloader(loader, DistributedSampler(ds, num_replicas=2, rank=1), mode=RunningStage.TRAINING)
    assert isinstance(new.batch_sampler, ClassBatchSampler) and new.batch_sampler.rank == 1
    assert [b[0].tolist() for b in new] == list(ClassBatchSampler(labels, 2, 3, seed=0, num_replicas=2, rank=1))


def test_sampler_rejects_batches_without_triplets():
    with pytest.raises(ConfigError, match="samples_per_class"):
        ClassBatchSampler(_labels(), 2, 1)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        ClassBatchSampler(torch.zeros(10, dtype=torch.long), 2, 2)


# ---------------------------------------------------------------------------------- scoring pieces
def test_class_gaussians_match_multivariate_normal_and_survive_dead_units():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])
    labels = torch.arange(300) % 3
    fitted = ClassGaussians(shrinkage=0.2).fit(x, labels)
    xc = x[labels == 2]
    cov = torch.cov(xc.T, correction=0)
    cov = 0.8 * cov + 0.2 * torch.diag(cov.diagonal()) + 1e-6 * cov.diagonal().mean() * torch.eye(5, dtype=x.dtype)
    torch.testing.assert_close(fitted.log_likelihood(x[:7])[:, 2], MultivariateNormal(xc.mean(0), cov).log_prob(x[:7]))
    x[:, 1] = 0.0  # a dead unit: singular covariance
    assert torch.isfinite(ClassGaussians(shrinkage=0.0).fit(x, labels).log_likelihood(x)).all()


def _results(val, test, train):
    """A one-scorer table with an ID fit (training) set: 2 classes, ID test predicted right, OOD predicted 0."""
    from ood_lightning.scoring.api import Key, Results

    test = torch.tensor(test)
    labels = torch.arange(len(test)) % 2
    scores = {Key("s", "id_val"): torch.tensor(val), Key("s", "id_test"): test, Key("s", "ood"): torch.tensor([0.5, 3.5])}
    preds = {k: (labels if k.split == "id_test" else torch.zeros(len(v), dtype=torch.long)) for k, v in scores.items()}
    return Results(scores, preds, labels, labels, 2, train_scores={"s": torch.tensor(train)})


def test_open_set_f1_threshold_is_the_5th_percentile_of_the_training_scores():
    """§4 Remark 2: the threshold keeps 95% of the *training* set, not of held-out validation data."""
    from ood_lightning.evaluation.metrics import open_set_macro_f1
    from ood_lightning.evaluation.results import compute_metrics

    train = [float(v) for v in range(1, 21)]  # keep 19 of 20 -> threshold 2.0 (the 5th percentile)
    val = [float(v) for v in range(10, 30)]  # keep 19 of 20 -> threshold 11.0
    test = [1.0, 2.5, 3.0, 4.0, 12.0, 15.0]
    results = _results(val, test, train)

    def f1(t):  # by hand: accepted iff score >= t
        return open_set_macro_f1(results.id_test_labels, results.id_test_labels, test, [0, 0], [0.5, 3.5], t, 2)

    assert f1(2.0) != f1(11.0)  # the two choices give different tables
    on_train = compute_metrics(results, 0.95, f1_threshold="id_train")
    assert on_train["results"]["s"]["ood"]["macro_f1"] == pytest.approx(f1(2.0))
    assert on_train["f1_threshold"] == {"tpr": 0.95, "split": {"s": "id_train"}}
    on_val = compute_metrics(results, 0.95, f1_threshold="id_val")
    assert on_val["results"]["s"]["ood"]["macro_f1"] == pytest.approx(f1(11.0))
    assert on_val["f1_threshold"]["split"] == {"s": "id_val"}
    results.train_scores.clear()  # no training scores (a per-batch scorer): validation, and said so
    fallback = compute_metrics(results, 0.95, f1_threshold="id_train")
    assert fallback["f1_threshold"]["split"] == {"s": "id_val"}
    with pytest.raises(ConfigError, match="evaluation.f1_threshold"):
        compute_metrics(results, 0.95, f1_threshold="train")


def test_vmdls_defaults_to_the_training_threshold(tmp_path):
    from ood_lightning.methods.base import OODMethod

    assert VMDLS.f1_threshold_split == "id_train" and OODMethod.f1_threshold_split == "id_val"
    cfg = compose_cfg("train", ["experiment=vmdls_mnist"], tmp_path)
    assert cfg.evaluation.f1_threshold == "auto"


def test_reconstruction_weighting():
    ll = torch.tensor([-50.0, -10.0, -2.0, 3.0])
    assert torch.equal(reconstruction_weighted(ll, torch.ones(4), 1.0), ll)  # w = 1: VMDLS == VMDLS_b
    heavier = reconstruction_weighted(ll, torch.full((4,), 3.0), 1.0)
    assert (heavier[:3] < ll[:3]).all() and heavier[3] == ll[3]  # above the reference: unweighted
    torch.testing.assert_close(heavier[:3], 1.0 + 3.0 * (ll[:3] - 1.0))


@pytest.mark.parametrize("size", [9, 28, 32])
def test_autoencoder_reconstructs_to_the_input_shape(size):
    assert ConvAutoencoder(3)(torch.randn(2, 3, size, size)).shape == (2, 3, size, size)


def _toy_outputs(model, n=60):
    x = torch.randn(n, 1, 12, 12)
    with torch.no_grad():
        feats = model.forward_features(x)
    layers = {k: v.flatten(2).mean(-1) if v.ndim > 2 else v for k, v in feats.items()}
    return Outputs(model.classify(feats["penultimate"]), feats["penultimate"], layers, torch.arange(n) % 3,
                   model.pass_values(x, feats)), x


def test_scores_without_autoencoder_are_equal_and_ablation_names():
    torch.manual_seed(0)
    model = VMDLS(SmallCNN(1, (4, 4, 8), 8), 3, None, latent_dim=2, ensemble_ablation=True).eval()
    train, _ = _toy_outputs(model)
    scorers = model.scorers()
    for scorer in scorers.values():  # the evaluation loop fits each; the Gaussians are fitted once
        scorer.fit(model, FitData(train))
    test = _toy_outputs(model, 20)[0]
    scores = {name: s.score(model, test) for name, s in scorers.items()}
    suffixes = ["", "_mu", "_mu_g", "_mu_g_t3", "_mu_g_t3_t2"]
    assert set(scores) == {f"vmdls{s}" for s in suffixes} | {f"vmdls_b{s}" for s in suffixes}
    for s in suffixes:  # w = 1 without an autoencoder: each weighted score is its unweighted one
        assert torch.equal(scores[f"vmdls{s}"], scores[f"vmdls_b{s}"])
    preds = {name: s.predict(model, train) for name, s in scorers.items()}
    assert preds["vmdls"].shape == (60,) and set(preds["vmdls"].tolist()) <= {0, 1, 2}
    with pytest.raises(RuntimeError, match="before fit_class_gaussians"):
        fresh = VMDLS(SmallCNN(1, (4, 4, 8), 8), 3, None)
        fresh.scorers()["vmdls_b"].score(fresh, train)


def _stored_outputs(model, n, gen):
    """Outputs with hand-made pooled layers (class-dependent means, no dead units) and a w per input."""
    labels = torch.arange(n) % 3
    shift = labels[:, None].double()
    layers = {name: torch.randn(n, dim, generator=gen, dtype=torch.float64) + k * shift
              for k, (name, dim) in enumerate([("block1", 3), ("block2", 4), ("block3", 5)], start=1)}
    g = (torch.randn(n, 8, generator=gen, dtype=torch.float64) - shift).float()  # g as the model reads it
    w = 0.2 + 2 * torch.rand(n, generator=gen, dtype=torch.float64)
    return Outputs(torch.zeros(n, 3), g, {**layers, "penultimate": g.double()}, labels, {"vmdls_w": w})


def test_ablation_scores_use_their_own_feature_sets():
    """Table 5's subsets, each score recomputed by hand from the stored per-layer features: scipy's Gaussian
    on the named subset (μ = the head's linear map of g), M from that subset's ID-train maximum. Every subset
    scores differently, so scores kept under their names but with swapped feature sets fail."""
    from scipy.stats import multivariate_normal

    torch.manual_seed(0)
    model = VMDLS(SmallCNN(1, (4, 4, 8), 8), 3, None, latent_dim=2, ensemble_ablation=True, shrinkage=0.01).eval()
    gen = torch.Generator().manual_seed(3)
    train, test = _stored_outputs(model, 150, gen), _stored_outputs(model, 40, gen)
    scorers = model.scorers()
    for scorer in scorers.values():
        scorer.fit(model, FitData(train))
    ours = {name: s.score(model, test).double() for name, s in scorers.items()}
    preds = {name: s.predict(model, test) for name, s in scorers.items()}

    weight, bias = (p.detach().double().numpy() for p in (model.latent.mu.weight, model.latent.mu.bias))

    def columns(out, names):
        g = out.layers["penultimate"].numpy()
        parts = {"t1": out.layers["block1"].numpy(), "t2": out.layers["block2"].numpy(),
                 "t3": out.layers["block3"].numpy(), "g": g, "mu": g @ weight.T + bias}
        return np.concatenate([parts[n] for n in names], 1)

    def class_loglik(names, out):
        x_train, x = columns(train, names), columns(out, names)
        y = train.labels.numpy()
        ll = []
        for c in range(3):
            xc = x_train[y == c]
            cov = np.cov(xc.T, bias=True)
            cov = 0.99 * cov + 0.01 * np.diag(np.diag(cov))
            cov += 1e-6 * np.diag(cov).mean() * np.eye(len(cov))
            ll.append(multivariate_normal(xc.mean(0), cov).logpdf(x))
        return np.stack(ll, 1)

    w_scale = float(train.extra["vmdls_w"].mean())
    sets = {"mu": ["mu"], "mu_g": ["g", "mu"], "mu_g_t3": ["t3", "g", "mu"], "mu_g_t3_t2": ["t2", "t3", "g", "mu"],
            "": ["t1", "t2", "t3", "g", "mu"]}
    by_hand = {}
    for suffix, names in sets.items():
        ll = class_loglik(names, test)
        reference = class_loglik(names, train).max(1).max() + model.reference_margin
        b, weighted = "vmdls_b" + (f"_{suffix}" if suffix else ""), "vmdls" + (f"_{suffix}" if suffix else "")
        by_hand[b] = torch.from_numpy(ll.max(1))
        w = test.extra["vmdls_w"] / w_scale
        by_hand[weighted] = by_hand[b] - (w - 1) * torch.relu(reference - by_hand[b])
        assert preds[b].tolist() == ll.argmax(1).tolist() and preds[weighted].tolist() == ll.argmax(1).tolist()
    assert set(ours) == set(by_hand)
    for name in by_hand:
        torch.testing.assert_close(ours[name], by_hand[name], rtol=1e-5, atol=1e-4, msg=name)
    for a, b in itertools.combinations(by_hand, 2):  # any two names swapped would change a score
        assert (by_hand[a] - by_hand[b]).abs().max() > 0.5, (a, b)


def test_reconstruction_weight_is_computed_per_input():
    torch.manual_seed(0)
    model = VMDLS(SmallCNN(1, (4, 4, 8), 8), 3, None, latent_dim=2, autoencoder=ConvAutoencoder(1, (4, 4), 2),
                  autoencoder_optimizer=torch.optim.Adam).eval()
    out, x = _toy_outputs(model)
    assert out.extra["vmdls_w"].shape == (60,) and (out.extra["vmdls_w"] > 0).all()
    with torch.no_grad():  # w from the pass's features agrees with a fresh pass
        torch.testing.assert_close(model.pass_values(x, model.backbone.forward_features(x))["vmdls_w"],
                                   out.extra["vmdls_w"])
    model.fit_class_gaussians(out)
    scores = model.own_scores(out)
    assert not torch.equal(scores["vmdls"], scores["vmdls_b"])


def test_a_missing_ensemble_layer_names_the_available_ones():
    model = VMDLS(SmallCNN(1, (4, 8), 8), 3, None, latent_dim=2)
    with pytest.raises(ConfigError, match=r"'block3' is not an output.*block1"):
        model.fit_class_gaussians(_toy_outputs(model)[0])


def test_check_layers_accepts_backbone_outputs_and_names_the_bad_key():
    model = VMDLS(SmallCNN(1, (4, 8), 8), 3, None, latent_dim=2, layers=["block2", "penultimate", "mu"],
                  autoencoder=ConvAutoencoder(1, (4, 4), 2), autoencoder_optimizer=torch.optim.Adam).train()
    model.check_layers((1, 12, 12))
    assert model.backbone.training  # the probe pass leaves the mode as it was
    model.layers = ["block1", "block3"]
    with pytest.raises(ConfigError, match=r"method.layers names 'block3'.*'block1', 'block2', 'penultimate', 'mu'"):
        model.check_layers((1, 12, 12))
    model.layers, model.reconstruction_layer = ["mu"], "mu"  # the input-space autoencoder needs a backbone layer
    with pytest.raises(ConfigError, match=r"method.reconstruction_layer names 'mu'"):
        model.check_layers((1, 12, 12))


# ---------------------------------------------------------------------------------- end to end
VMDLS_TINY = [*TINY, "method=vmdls", "backbone.widths=[8,8,16]", "method.latent_dim=4", "method.samples_per_class=16",
              "method.autoencoder.widths=[4,8]", "method.autoencoder.bottleneck=2", "detectors=fast",
              "trainer.max_epochs=2", "trainer.limit_train_batches=3"]


@pytest.mark.slow
def test_tiny_run_writes_f1_and_auroc_for_vmdls_and_vmdls_b(tmp_path):
    metrics = train_cfg(VMDLS_TINY, tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["method"] == "vmdls"
    scores = np.load(tmp_path / "scores.npz")
    assert metrics["results"] == written["results"]
    # the paper's threshold (§4 Remark 2): 95% of the *training* scores, for every scorer that has them
    check_reported_metrics(written, scores, "diagonal", ("vmdls", "vmdls_b", "msp"), num_classes=2,
                           threshold_split="id_train")
    assert len(scores["vmdls/id_test"]) == 256 and np.isfinite(scores["vmdls/diagonal"]).all()
    rows = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/kl" in rows and "train/reconstruction" in rows
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert bool(state["head.seen"].all()) and any(k.startswith("autoencoder.") for k in state)


@pytest.mark.slow
def test_a_layer_the_backbone_lacks_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"method.layers names 'block3'"):
        train_cfg([*VMDLS_TINY, "backbone.widths=[8,16]"], tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.slow
def test_tiny_run_without_autoencoder_gives_identical_vmdls_and_vmdls_b(tmp_path):
    train_cfg([*VMDLS_TINY, "method.autoencoder=null", "trainer.max_epochs=1", "detectors=none"], tmp_path)
    scores = np.load(tmp_path / "scores.npz")
    for split in ("id_val", "id_test", "diagonal"):
        np.testing.assert_array_equal(scores[f"vmdls/{split}"], scores[f"vmdls_b/{split}"])


def train_cfg(overrides, out):
    from ood_lightning.run.runs import train

    return train(compose_cfg("train", overrides, out))


def test_training_batches_are_class_structured(tmp_path):
    """The method's batch sampler, handed to the data module, gives the training batches."""
    import lightning as L

    from ood_lightning.data.datamodule import OODDataModule
    from ood_lightning.run.build import build_model

    cfg = compose_cfg("train", VMDLS_TINY, tmp_path)
    dm = OODDataModule(cfg.data, cfg.ood)
    dm.setup("fit")
    model = build_model(cfg, dm.num_classes)
    dm.batch_sampler_factory = model.train_batch_sampler  # what the run's assembly does
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    seen = []
    model.on_train_batch_start = lambda batch, idx: seen.append(batch[1].clone())
    trainer.fit(model, datamodule=dm)
    assert len(seen) == 1 and sorted(torch.bincount(seen[0]).tolist()) == [16, 16]


def test_mnist_preset_composes(tmp_path):
    cfg = compose_cfg("train", ["experiment=vmdls_mnist"], tmp_path)
    assert cfg.method._target_.endswith("VMDLS") and cfg.data.name == "mnist"
    assert cfg.ood.mnist_noise.dataset == "additive_noise" and cfg.ood.noise.dataset == "uniform_noise"
    cfg = compose_cfg("train", ["experiment=vmdls_cifar10"], tmp_path)
    assert cfg.backbone._target_.endswith("resnet18") and set(cfg.ood) == {"tin_crop", "tin_resize"}


def test_additive_noise_set(monkeypatch, tmp_path):
    from ood_lightning.data import registry
    from ood_lightning.data.registry import additive_noise

    base = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    monkeypatch.setitem(registry.DATASETS, "fake", lambda **_: registry.ArrayData(base, torch.arange(5)))
    data = additive_noise(tmp_path, base="fake", amplitude=0.5, seed=3)
    delta = data.images - base.float() / 255
    assert data.images.dtype == torch.float32 and (delta >= 0).all() and (delta < 0.5).all() and delta.std() > 0.05
    torch.testing.assert_close(additive_noise(tmp_path, base="fake", seed=3).images, data.images)
