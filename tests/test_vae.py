"""method=vae / method=ganvae: the IWAE bound against a closed-form marginal likelihood,
the decoder likelihoods, BatchNorm-statistics adaptation, ELBO components, a few training
steps, the pictures and latent probe, and one end-to-end run of train()."""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ood_lightning.data.datamodule import OODDataModule
from ood_lightning.methods.vae.bn_adaptation import batch_norms, batch_statistics, bn_state, reestimate_bn_stats
from ood_lightning.methods.vae.ganvae import GANVAE
from ood_lightning.methods.vae.latent_probe import fit_latent_probe, walk_along_normal
from ood_lightning.methods.vae.model import VAE, gaussian_kl_terms, iwae_bound, iwae_log_weights
from ood_lightning.nn.dcgan import DCGANDecoder, DCGANEncoder
from ood_lightning.nn.likelihoods import Categorical256, DiscretizedLogistic, GaussianFixedVariance, to_bins
from ood_lightning.run.runs import train
from ood_lightning.scoring.api import Results
from ood_lightning.scoring.passes import extract
from tests.conftest import compose_cfg, sklearn_auroc

torch.set_num_threads(1)


def tiny_vae(cls=VAE, likelihood="gaussian", size=9, channels=1, **kwargs) -> VAE:
    enc = DCGANEncoder(in_channels=channels, image_size=size, widths=(8, 16))
    opt = lambda params: torch.optim.Adam(params, lr=2e-3)  # noqa: E731
    return cls(enc, num_classes=2, optimizer=opt, latent_dim=4, likelihood=likelihood, iwae_samples=(1, 5, 20),
               decode_batch=256, **kwargs)


def toy_images(n=256, size=9, seed=0, shift=0.0) -> torch.Tensor:
    """Smooth blobs in [0, 1] (1 channel); ``shift`` brightens them (a covariate shift)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = torch.rand(n, 2, generator=g) * (size - 1)
    d2 = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2
    return (torch.exp(-d2 / 6.0) * 0.8 + shift).clamp(0, 1).unsqueeze(1)


# -- the IWAE bound ------------------------------------------------------------------------------------
def test_iwae_approaches_closed_form_marginal_of_linear_gaussian_and_grows_with_k():
    """p(z) = N(0, I), p(x|z) = N(Wz + b, s2 I) has p(x) = N(b, W W^T + s2 I). With a
    deliberately poor diagonal q, E[IWAE_K] increases with K towards log p(x)."""
    torch.manual_seed(0)
    d, D, s2 = 2, 3, 0.3
    W, b = torch.randn(D, d, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    marginal = torch.distributions.MultivariateNormal(b, W @ W.T + s2 * torch.eye(D, dtype=torch.float64))
    x = marginal.sample((200,))
    log_px_true = marginal.log_prob(x)
    post_cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + W.T @ W / s2)
    post_mu = (x - b) @ W @ post_cov.T / s2
    mu = post_mu + 0.3  # biased mean and an inflated diagonal variance: a poor but valid q
    logvar = torch.log(1.5 * torch.diagonal(post_cov)).expand_as(mu)

    def log_px_given_z(z, xs):
        return torch.distributions.Normal(z @ W.T + b, math.sqrt(s2)).log_prob(xs).sum(-1)

    bounds = {}
    for k in (1, 5, 50, 2000):
        reps = [iwae_bound(iwae_log_weights(x, mu, logvar, log_px_given_z, k, max_batch=20_000)[0]) for _ in range(5)]
        bounds[k] = float(torch.stack(reps).mean() - log_px_true.mean())  # gap to the truth, averaged
    assert bounds[1] < bounds[5] < bounds[50] <= bounds[2000] + 1e-3, bounds
    assert bounds[1] < -0.05  # the poor q has a visible ELBO gap ...
    assert abs(bounds[2000]) < 0.01, bounds  # ... that IWAE closes
    # the chunked evaluation (few latents per decoder pass) is the same estimator
    torch.manual_seed(1)
    full = iwae_log_weights(x, mu, logvar, log_px_given_z, 7, max_batch=10_000)[0]
    torch.manual_seed(1)
    chunked = iwae_log_weights(x, mu, logvar, log_px_given_z, 7, max_batch=200)[0]
    assert chunked.shape == full.shape == (7, 200) and torch.isfinite(chunked).all()
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)  # same noise, same log-weights
    torch.manual_seed(1)
    uneven = iwae_log_weights(x, mu, logvar, log_px_given_z, 7, max_batch=600)[0]  # chunks of 3, 3, 1
    torch.testing.assert_close(uneven, full, rtol=0, atol=1e-12)


# -- the likelihoods -------------------------------------------------------------------------------------
def test_discrete_likelihoods_are_normalised_and_bins_are_recovered():
    k = torch.arange(256)
    assert torch.equal(to_bins(k / 255.0), k) and torch.equal(to_bins((k + 0.999) / 256.0), k)
    x = (k.float() / 255.0).view(256, 1, 1, 1)
    torch.manual_seed(0)
    logistic = torch.randn(1, 2, 1, 1).expand(256, 2, 1, 1)
    categorical = torch.randn(1, 256, 1, 1).expand(256, 256, 1, 1)
    for lik, params in ((DiscretizedLogistic(), logistic), (Categorical256(), categorical)):
        total = torch.logsumexp(lik.log_prob(params, x), 0)
        assert total.item() == pytest.approx(0.0, abs=1e-4), type(lik).__name__
        assert lik.mean(params[:1]).shape == (1, 1, 1, 1) and 0 <= lik.sample(params[:1]).min() <= 1
    gauss = GaussianFixedVariance(0.1)
    params, xg = torch.randn(4, 3, 5, 5), torch.rand(4, 3, 5, 5)
    ref = torch.distributions.Normal(torch.sigmoid(params), math.sqrt(0.1)).log_prob(xg).flatten(1).sum(1)
    assert torch.allclose(gauss.log_prob(params, xg), ref - 75 * math.log(256), atol=1e-3)
    assert torch.all(gauss.distortion(params, xg) >= 0)


def test_dcgan_networks_handle_any_square_size():
    for size, channels in ((9, 1), (28, 1), (32, 3)):
        enc = DCGANEncoder(channels, size, widths=(8, 16, 32))
        dec = DCGANDecoder.mirror(enc, latent_dim=5, out_channels=channels * 2)
        feats = enc.forward_features(torch.rand(2, channels, size, size))
        assert feats["penultimate"].shape == (2, enc.feature_dim)
        assert dec(torch.randn(2, 5)).shape == (2, channels * 2, size, size)


# -- BatchNorm adaptation --------------------------------------------------------------------------------
def test_bn_reestimation_changes_running_stats_only():
    torch.manual_seed(0)
    vae = tiny_vae().eval()
    weights = {k: v.clone() for k, v in vae.named_parameters()}
    bns = batch_norms(vae.backbone)
    before = bn_state(bns)
    shifted = toy_images(192, shift=0.4)
    n = reestimate_bn_stats(bns, shifted.split(64), vae.backbone)
    assert n == 3 and all(not bn.training for bn in bns) and all(bn.momentum == 0.1 for bn in bns)
    assert not torch.allclose(before[0]["running_mean"], bns[0].running_mean)
    for name, w in vae.named_parameters():
        assert torch.equal(w, weights[name]), name
    # equal-weight average of the per-batch statistics: one BatchNorm on known data
    bn = torch.nn.BatchNorm1d(2)
    data = torch.randn(300, 2) * 3 + 5
    reestimate_bn_stats([bn], data.split(100), bn)
    assert torch.allclose(bn.running_mean, data.mean(0), atol=1e-5)


def test_batch_statistics_changes_scores_and_restores_the_model():
    torch.manual_seed(0)
    vae = tiny_vae(adapt_bn="encoder").eval()
    x = toy_images(64, shift=0.3)
    bns = batch_norms(vae.backbone)
    before = bn_state(bns)
    mu_plain = vae.encode(x)[0]
    with batch_statistics(bns):
        mu_adapted = vae.encode(x)[0]
    assert not torch.allclose(mu_plain, mu_adapted)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, bn_state(bns)) for k in a)
    assert all(not bn.training for bn in bns)
    scores = vae.pass_values(x)
    assert {"iwae_k20", "iwae_k20_bn_encoder", "elbo_bn_encoder"} <= set(scores)
    assert not torch.allclose(scores["elbo"], scores["elbo_bn_encoder"])
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, bn_state(bns)) for k in a)


def test_stream_statistics_through_prepare_split():
    torch.manual_seed(0)
    vae = tiny_vae(adapt_bn="both", bn_stats="stream").eval()
    x = toy_images(128, shift=0.3)
    bns = batch_norms(vae.backbone, vae.decoder)
    before = bn_state(bns)
    with pytest.raises(Exception, match="prepare_split"):
        vae.pass_values(x)
    loader = DataLoader(TensorDataset(x, torch.zeros(128)), batch_size=32)
    vae.prepare_split("shifted", loader, lambda t: t, "cpu")
    scores = vae.pass_values(x[:16])
    assert torch.isfinite(scores["iwae_k5_bn_both"]).all()
    assert not torch.allclose(scores["elbo"], scores["elbo_bn_both"])
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, bn_state(bns)) for k in a)


# -- ELBO components ---------------------------------------------------------------------------------------
def _monte_carlo_elbo(vae, x, n_mc=2000):
    """Single-sample ELBOs log p(x|z) + log p(z) - log q(z|x), z ~ q(z|x), [n_mc, B] in float64,
    with every density from torch.distributions: q and p(z) Normals, and the discretised
    logistic's bin mass as a difference of a logistic CDF (a sigmoid-transformed uniform)."""
    from torch.distributions import Normal, TransformedDistribution, Uniform
    from torch.distributions.transforms import AffineTransform, SigmoidTransform

    with torch.no_grad():
        mu, logvar = vae.encode(x)
        q = Normal(mu.double(), torch.exp(0.5 * logvar.double()))
        z = q.sample((n_mc,))  # [S, B, d]
        log_q, log_pz = q.log_prob(z).sum(-1), Normal(0.0, 1.0).log_prob(z).sum(-1)
        params = torch.cat([vae.decode(zc.float()) for zc in z.reshape(-1, z.shape[-1]).split(8000)]).double()
        params = params.view(n_mc, x.shape[0], *params.shape[1:])
        c = x.shape[1]
        loc, scale = torch.sigmoid(params[:, :, :c]), torch.exp(params[:, :, c:].clamp(-7.0, 7.0))
        logistic = TransformedDistribution(Uniform(torch.zeros_like(loc), torch.ones_like(loc)),
                                           [SigmoidTransform().inv, AffineTransform(loc, scale)])
        k = torch.floor(x.double() * 256).clamp(0, 255).expand_as(loc)  # the 8-bit value of each pixel
        upper = torch.where(k > 254.5, torch.ones_like(loc), logistic.cdf(((k + 1) / 256).clamp(max=1.0)))
        lower = torch.where(k < 0.5, torch.zeros_like(loc), logistic.cdf(k / 256))
        log_px = torch.log(upper - lower).flatten(2).sum(-1)  # [S, B]
    return log_px, log_px + log_pz - log_q


def test_components_sum_to_the_elbo_and_bounds_order():
    torch.manual_seed(0)
    vae = tiny_vae(likelihood="logistic").eval()
    x = toy_images(32)
    e = vae.pass_values(x)
    # rec (a mean over the K = 20 IWAE samples) and the ELBO against an independent Monte-Carlo
    # estimate from 2000 fresh draws, within 4 standard errors of the difference of the two means.
    nb, n_mc, k_max = 8, 2000, vae.iwae_samples[-1]
    log_px, elbo1 = _monte_carlo_elbo(vae, x[:nb], n_mc)
    se_rec = torch.sqrt(log_px.var(0) / k_max + log_px.var(0) / n_mc)
    se_elbo = torch.sqrt(log_px.var(0) / k_max + elbo1.var(0) / n_mc)
    assert (se_rec < 0.2).all() and (se_elbo < 0.2).all()  # nats: a tight check, not a vacuous one
    assert ((e["rec"][:nb].double() - log_px.mean(0)).abs() < 4 * se_rec).all(), (e["rec"][:nb], log_px.mean(0))
    assert ((e["elbo"][:nb].double() - elbo1.mean(0)).abs() < 4 * se_elbo).all(), (e["elbo"][:nb], elbo1.mean(0))
    kl = 0.5 * (e["mu_sq"] + e["var_m1_sum"] - e["logvar_sum"])
    assert torch.allclose(e["elbo"], e["rec"] - kl, atol=1e-4)
    mu, logvar = vae.encode(x)
    kl_ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, torch.exp(0.5 * logvar)),
                                               torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(gaussian_kl_terms(mu, logvar)["kl"], kl_ref, atol=1e-4)

    class Out:
        extra = e

    s = vae.own_scores(Out())
    parts = s["elbo_rec"] + s["elbo_mu"] + s["elbo_logvar"] + s["elbo_var"]
    assert torch.allclose(parts, s["elbo"], atol=1e-5)
    assert torch.allclose(s["elbo"], -vae.bits_per_dim(e["elbo"]))
    for suffix in ("", "_bn_encoder"):
        parts = sum(s[f"elbo_{c}{suffix}"] for c in ("rec", "mu", "logvar", "var"))
        assert torch.allclose(parts, s[f"elbo{suffix}"], atol=1e-5)
    # IWAE with more samples is (on average) the tighter bound
    assert e["iwae_k20"].mean() >= e["elbo"].mean()


# -- training ---------------------------------------------------------------------------------------------
def _fit(model, steps=25, n=256):
    x = toy_images(n)
    loader = DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=32, shuffle=True)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, loader)
    return model.eval(), x


@pytest.mark.parametrize("likelihood", ["gaussian", "logistic", "categorical"])
def test_tiny_vae_trains_a_few_steps_with_finite_bpd(likelihood):
    torch.manual_seed(0)
    model = tiny_vae(likelihood=likelihood)
    x = toy_images(64)
    with torch.no_grad():
        before = model.eval().pass_values(x)["elbo"].mean()
    model, _ = _fit(model.train())
    with torch.no_grad():
        scores = model.pass_values(x)
    bpd = model.bits_per_dim(scores["iwae_k20"])
    assert torch.isfinite(bpd).all() and (bpd > 0).all()
    assert scores["elbo"].mean() > before  # training improved the ELBO


def test_ganvae_trains_a_few_steps_with_finite_bpd():
    torch.manual_seed(0)
    model = tiny_vae(GANVAE, beta_neg=16.0)
    x = toy_images(256)[:32]  # the first 32 training images
    with torch.no_grad():
        before = model.eval().pass_values(x)["elbo"].mean()
    model, _ = _fit(model.train(), steps=12)
    with torch.no_grad():
        scores = model.pass_values(x)
    bpd = model.bits_per_dim(scores["iwae_k5"])
    assert torch.isfinite(bpd).all() and (bpd > 0).all()
    assert scores["elbo"].mean() > before  # training improved the ELBO


# -- pictures and the latent probe ----------------------------------------------------------------------
def test_latent_probe_separates_shifted_gaussians():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 6)), rng.normal(size=(300, 6))
    b[:, 2] += 4.0
    p = fit_latent_probe(a, b, max_per_set=None)
    assert p.positive_accuracy > 0.95 and p.negative_accuracy > 0.95 and p.n_test == 300
    assert abs(abs(p.normal[2]) - 1) < 0.1 and p.distances_id.mean() > 0 > p.distances_ood.mean()
    walk = walk_along_normal(a[:2], p, np.array([-1.0, 0.0, 2.0]))
    assert np.allclose(p.distance(walk.reshape(-1, 6)).reshape(2, 3), [[-1, 0, 2]] * 2, atol=1e-6)


def test_report_writes_pictures_probe_and_bits_per_dim(tmp_path):
    torch.manual_seed(0)
    dm = OODDataModule({"name": "stripes", "root": ".", "n_train": 300, "n_test": 200, "val_size": 50,
                        "batch_size": 64, "channels": 1},
                       {"diagonal": {"dataset": "diagonal_stripes", "n": 200, "seed": 7}})
    dm.setup("test")
    model = tiny_vae().eval()
    outs = {split: extract(model, loader, dm.preprocess, torch.device("cpu"), pass_values=model.pass_values)
            for split, loader in dm.eval_dataloaders().items()}
    labels = outs["id_test"].labels
    results = Results({}, {}, labels, labels, num_classes=1, has_classifier=False, outputs=outs)
    summary = model.report(tmp_path, results, dm)["generative"]
    for name in ("samples", "reconstructions", "elbo_components", "elbo_components_bn_encoder", "latent_probe",
                 "latent_walk_diagonal"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 2000, name
    written = json.loads((tmp_path / "generative.json").read_text())
    assert written == summary
    assert set(summary["bits_per_dim"]) == {"id_val", "id_test", "diagonal"}
    # bits/dim of each split and bound: -mean(log-likelihood in nats) / (D ln 2), D = 1 * 9 * 9
    for split, by in summary["bits_per_dim"].items():
        for key in ("iwae_k1", "iwae_k20", "elbo"):
            nats = outs[split].extra[key].double().numpy()
            assert by[key] == pytest.approx(-nats.mean() / (81 * math.log(2)), rel=1e-9), (split, key)
        assert 0 < by["iwae_k20"] <= by["elbo"] + 1e-3  # the K = 20 bound is the tighter one
    # the thesis' probe (Table 3.1): ID *training* latents (un-augmented, all 250 here) against each OOD set
    # and against ID test, on balanced held-out halves
    assert summary["latent_probe_positive"] == "id_train" and set(summary["latent_probe"]) == {"id_test", "diagonal"}
    with torch.no_grad():
        train_z = model.encode(dm.preprocess(dm.train_set.images))[0].numpy()
    assert len(train_z) == 250
    probe = summary["latent_probe"]["diagonal"]
    assert probe["n_test"] == 200 and probe["n_train"] == 200
    assert probe["accuracy"] == pytest.approx((probe["positive_accuracy"] + probe["negative_accuracy"]) / 2)
    expected = fit_latent_probe(train_z, outs["diagonal"].features.numpy()).summary()
    assert probe == pytest.approx(expected, abs=1e-6)  # wiring: the right splits and the configured probe settings
    expected = fit_latent_probe(train_z, outs["id_test"].features.numpy()).summary()
    assert summary["latent_probe"]["id_test"] == pytest.approx(expected, abs=1e-6)
    # Table 3.1's "BN train" rows: the same probes on latents with the encoder's BN in train mode, each
    # shuffled batch of 512 (fixed seeds) normalised by its own statistics
    def bn_train_latents(data, seed):
        index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:5000]
        with torch.no_grad(), batch_statistics(batch_norms(model.backbone)):
            return torch.cat([model.encode(dm.preprocess(data.images[c]))[0] for c in index.split(512)]).numpy()

    pos = bn_train_latents(dm.train_set, 11)
    assert set(summary["latent_probe_bn_train"]) == {"id_test", "diagonal"}
    for name, data, seed in (("id_test", dm.test_set, 12), ("diagonal", dm.ood_sets["diagonal"], 13)):
        expected = fit_latent_probe(pos, bn_train_latents(data, seed)).summary()
        assert summary["latent_probe_bn_train"][name] == pytest.approx(expected, abs=1e-6), name
    assert (tmp_path / "plots" / "latent_probe_bn_train.png").stat().st_size > 2000


# -- end to end -------------------------------------------------------------------------------------------
VAE_TINY = ["data=stripes", "ood=diagonal_stripes", "method=vae", "backbone=dcgan", "backbone.widths=[8,16]",
            "method.latent_dim=4", "method.iwae_samples=[2,8]", "trainer=cpu", "debug=fast", "logger=csv",
            "data.n_train=600", "data.n_test=200", "data.val_size=100", "ood.diagonal.n=200"]


@pytest.mark.parametrize("overrides", [["method=vae", "backbone=dcgan"], ["method=vae", "backbone=dcgan", "data=stripes"],
                                       ["experiment=vae_cifar10", "method=ganvae", "method.likelihood=categorical"],
                                       ["experiment=vae_mnist", "method.likelihood=logistic"]])
def test_configs_build_the_model_on_unnormalised_dequantised_data(overrides, tmp_path):
    from ood_lightning.data.datamodule import OODDataModule
    from ood_lightning.run.build import build_model, connect

    cfg = compose_cfg("train", overrides, tmp_path)
    model = build_model(cfg, num_classes=10)
    assert isinstance(model, GANVAE if "method=ganvae" in overrides else VAE) and model.latent_dim == 128
    assert model.image_shape == (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    dm = OODDataModule(cfg.data, cfg.ood)
    connect(dm, model)  # the method's inputs win over the data config: [0, 1] pixels, dequantised, no augmentation
    p = dm.preprocess
    assert not p.normalise and p.dequantize and p.crop_padding == 0 and not p.hflip
    x = torch.full((2, cfg.data.channels, 4, 4), 255, dtype=torch.uint8)
    assert torch.equal(p(x), torch.ones(2, cfg.data.channels, 4, 4))
    if "experiment" in overrides[0]:
        assert not cfg.get("detectors")
    assert bool(model.early_stopping) == ("method=ganvae" not in overrides)


@pytest.mark.slow
def test_train_vae_end_to_end_writes_iwae_scores(tmp_path):
    metrics = train(compose_cfg("train", [*VAE_TINY, "trainer.max_epochs=2"], tmp_path))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["method"] == "vae" and written["accuracy"] is None
    scores = np.load(tmp_path / "scores.npz")
    for det in ("iwae_k2", "iwae_k8", "elbo", "iwae_k8_bn_encoder", "elbo_rec", "elbo_mu", "elbo_logvar", "elbo_var"):
        # metrics.json agrees with scikit-learn on the saved scores (ID = the positive class)
        id_s, ood_s = scores[f"{det}/id_test"], scores[f"{det}/diagonal"]
        truth = sklearn_auroc(id_s, ood_s)
        assert written["results"][det]["diagonal"]["auroc"] == pytest.approx(truth, abs=1e-12), det
        assert "macro_f1" not in written["results"][det]["diagonal"]
    assert metrics["results"] == written["results"]
    assert len(scores["iwae_k8/id_test"]) == 200 and np.isfinite(scores["iwae_k8/diagonal"]).all()
    parts = sum(scores[f"elbo_{c}/diagonal"] for c in ("rec", "mu", "logvar", "var"))
    assert np.allclose(parts, scores["elbo/diagonal"], atol=1e-4)
    assert (tmp_path / "checkpoints" / "best.ckpt").exists() and (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert written["generative"]["bits_per_dim"]["id_test"]["iwae_k8"] > 0 and "diagonal" in written["generative"]["latent_probe"]
    for name in ("samples", "reconstructions", "elbo_components", "latent_probe", "latent_walk_diagonal"):
        assert (tmp_path / "plots" / f"{name}.png").exists(), name


@pytest.mark.parametrize(("overrides", "expected"), [
    (["method=vae"], [5, 50]), (["method=vae", "debug=fast"], [5, 8]), (["method=ganvae", "debug=fast"], [5, 8]),
    (["method=vae", "debug=fast", "method.iwae_samples=[3]"], [3])])
def test_debug_fast_takes_fewer_iwae_samples_unless_given(overrides, expected, tmp_path):
    from ood_lightning.run.build import build_model

    cfg = compose_cfg("train", [*overrides, "backbone=dcgan"], tmp_path)
    assert build_model(cfg, num_classes=10).iwae_samples == expected


# -- tests that a wrong VAE / GAN-VAE fails ---------------------------------------------
@pytest.mark.parametrize("bn_stats", ["batch", "stream"])
def test_encoder_bn_adaptation_leaves_the_decoder_alone(bn_stats):
    """adapt_bn=encoder: inside the adapted block the encoder's output changes, the decoder's does not."""
    torch.manual_seed(0)
    vae = tiny_vae(adapt_bn="encoder", bn_stats=bn_stats).eval()
    x, z = toy_images(64, shift=0.3), torch.randn(64, 4)
    if bn_stats == "stream":
        vae.prepare_split("shifted", DataLoader(TensorDataset(x, torch.zeros(64)), batch_size=32), lambda t: t, "cpu")
    with torch.no_grad():
        mu_plain, dec_plain = vae.encode(x)[0], vae.decode(z)
        with vae.adapted_bn():
            mu_adapted, dec_adapted = vae.encode(x)[0], vae.decode(z)
    assert not torch.allclose(mu_plain, mu_adapted)
    assert torch.equal(dec_plain, dec_adapted)


def test_bn_reestimation_resets_mean_variance_and_count_of_a_used_layer():
    """A layer with old statistics (and a batch count): the re-estimate is the equal-weight average of
    the new batches' mean and unbiased variance only, nothing of the old statistics left."""
    bn = torch.nn.BatchNorm1d(2)
    bn.running_mean.fill_(50.0)
    bn.running_var.fill_(100.0)
    bn.num_batches_tracked.fill_(1000)
    data = torch.randn(300, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 3.0]) + 5
    batches = data.split(100)
    reestimate_bn_stats([bn], batches, bn)
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0))
    assert int(bn.num_batches_tracked) == 3


def test_iwae_with_k_below_max_uses_the_first_k_samples(monkeypatch):
    """pass_values' iwae_k5 from K_max = 20 weights = an independent logsumexp over the first 5."""
    import ood_lightning.methods.vae.model as vae_module

    vae = tiny_vae().eval()
    x = toy_images(3)
    log_w = torch.cat([torch.zeros(5, 3), torch.full((15, 3), 7.0)]) + torch.arange(20.0)[:, None] * 0.01
    real = vae_module.iwae_log_weights
    monkeypatch.setattr(vae_module, "iwae_log_weights",
                        lambda *a, **k: (log_w[: a[4]], real(*a, **k)[1]))
    e = vae.pass_values(x)
    first = log_w[:5].double().numpy()
    expected = np.log(np.mean(np.exp(first), axis=0))
    np.testing.assert_allclose(e["iwae_k5"].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(e["iwae_k20"].numpy(), np.log(np.mean(np.exp(log_w.double().numpy()), axis=0)), atol=1e-5)


def test_elbo_component_labels_on_a_closed_form_posterior(monkeypatch):
    """μ = (1, 2, 0, 0), log σ² = (0, log 2, 0, 0): ‖μ‖² = 5, Σ log σ² = log 2, Σ(σ² − 1) = 1, KL = (5 + 1 − log 2)/2."""
    vae = tiny_vae(adapt_bn="none").eval()
    x = toy_images(2)
    mu = torch.tensor([[1.0, 2.0, 0.0, 0.0]]).repeat(2, 1)
    logvar = torch.tensor([[0.0, math.log(2.0), 0.0, 0.0]]).repeat(2, 1)
    monkeypatch.setattr(vae, "encode", lambda inputs: (mu, logvar))
    e = vae.pass_values(x)
    torch.testing.assert_close(e["mu_sq"], torch.full((2,), 5.0))
    torch.testing.assert_close(e["logvar_sum"], torch.full((2,), math.log(2.0)))
    torch.testing.assert_close(e["var_m1_sum"], torch.full((2,), 1.0))
    torch.testing.assert_close(e["elbo"], e["rec"] - 0.5 * (6.0 - math.log(2.0)))

    class Out:
        extra = e

    s, c = vae.own_scores(Out()), 1.0 / (vae.num_dims * math.log(2))
    torch.testing.assert_close(s["elbo_mu"], torch.full((2,), -2.5 * c))
    torch.testing.assert_close(s["elbo_logvar"], torch.full((2,), 0.5 * math.log(2.0) * c))
    torch.testing.assert_close(s["elbo_var"], torch.full((2,), -0.5 * c))
    torch.testing.assert_close(s["elbo_rec"], e["rec"] * c)


def test_ganvae_loss_pieces_on_a_hand_computable_case():
    """s = 1/2, alpha = 2, b_rec = 1, b_kl = 1, b_neg = 3: encoder
    0.5 (1 + 2) + 1/4 (e^{-2·0.5·(1 + 3·1)} + e^{-2·0.5·(0 + 3·2)}) = 1.5 + (e^-4 + e^-6)/4; decoder with
    gamma_r = 0.1: 0.5 (1 + (1 + 2)/2 + 0.1 (1 + 0)/2) = 1.275. Fails on the exp terms removed or
    sign-flipped and on the fake KL weighted by b_kl instead of b_neg."""
    from ood_lightning.methods.vae.ganvae import decoder_loss, encoder_loss

    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    fakes = [(one(1), one(1)), (one(0), one(2))]
    loss_e, exp_elbo = encoder_loss(0.5, one(1), one(2), fakes, beta_rec=1.0, beta_kl=1.0, beta_neg=3.0, alpha=2.0)
    assert [float(t) for t in exp_elbo] == pytest.approx([math.exp(-4), math.exp(-6)])
    assert float(loss_e) == pytest.approx(1.5 + (math.exp(-4) + math.exp(-6)) / 4)
    loss_d = decoder_loss(0.5, one(1), [one(1), one(2)], [one(1), one(0)], beta_rec=1.0, beta_kl=1.0, gamma_r=0.1)
    assert float(loss_d) == pytest.approx(1.275)


def test_ganvae_step_weights_the_fakes_kl_by_beta_neg(monkeypatch):
    """The training step hands the encoder loss b_neg (not b_kl) for the fakes, and two fakes (recon, prior)."""
    import ood_lightning.methods.vae.ganvae as ganvae_module

    seen = []
    real = ganvae_module.encoder_loss

    def spy(s, rec_real, kl_real, fakes, beta_rec, beta_kl, beta_neg, alpha):
        seen.append((len(fakes), beta_kl, beta_neg))
        return real(s, rec_real, kl_real, fakes, beta_rec, beta_kl, beta_neg, alpha)

    monkeypatch.setattr(ganvae_module, "encoder_loss", spy)
    torch.manual_seed(0)
    _fit(tiny_vae(GANVAE, beta_neg=16.0, beta_kl=0.5).train(), steps=1, n=32)
    assert seen == [(2, 0.5, 16.0)]
