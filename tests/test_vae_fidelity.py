"""The thesis' VAE / GAN-VAE as configured: what the documented commands
resolve to, the GAN-VAE preset's loss weights on a hand-computed case, the encoder's exp-ELBO
target, latents with BN in train mode (Table 3.1) and decoder BN statistics from prior samples
(§3.3.5), each against an independent closed form."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ood_lightning.methods.vae.bn_adaptation import batch_norms, bn_state
from ood_lightning.methods.vae.ganvae import GANVAE
from tests.conftest import compose_cfg
from tests.test_vae import tiny_vae, toy_images

torch.set_num_threads(1)


# -- item 12: the documented commands train as the thesis / Soft-IntroVAE do ---------------------------------
@pytest.mark.parametrize(("overrides", "epochs", "batch"), [
    (["method=vae", "backbone=dcgan", "data=cifar10"], 100, 128),
    (["method=ganvae", "backbone=dcgan", "data=cifar10"], 250, 128),
    (["experiment=vae_cifar10"], 100, 128),
    (["experiment=vae_cifar10", "method=ganvae"], 250, 128),
    (["experiment=ganvae_cifar10"], 250, 32),
])
def test_documented_commands_resolve_to_the_method_budget_and_no_augmentation(overrides, epochs, batch, tmp_path):
    from ood_lightning.data.datamodule import OODDataModule
    from ood_lightning.run.build import build_model, connect

    cfg = compose_cfg("train", overrides, tmp_path)
    assert cfg.trainer.max_epochs == epochs and cfg.data.batch_size == batch
    model = build_model(cfg, num_classes=10)
    dm = OODDataModule(cfg.data, cfg.ood)
    connect(dm, model)
    p = dm.preprocess  # the data config's crop + flip are on for CIFAR-10; the method turns them off
    assert cfg.data.augment.hflip and cfg.data.augment.crop_padding == 4
    assert not p.hflip and p.crop_padding == 0 and p.dequantize and not p.normalise
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float64).remainder(256).to(torch.uint8).view(2, 3, 32, 32)
    torch.manual_seed(0)
    noisy = p(x, train=True)  # training inputs: (k + u) / 256, not flipped or shifted
    assert torch.equal(torch.floor(noisy * 256).to(torch.uint8), x)


@pytest.mark.parametrize(("overrides", "epochs"), [
    (["method=classifier"], 3),  # a method without its own budget keeps the trainer's default
    (["method=vae", "backbone=dcgan", "trainer.max_epochs=7"], 7),  # the command line wins
    (["method=ganvae", "backbone=dcgan", "debug=fast"], 1),
    (["method=vae", "backbone=dcgan", "method.epochs=12"], 12),
])
def test_the_trainer_budget_comes_from_the_method_unless_given(overrides, epochs, tmp_path):
    assert compose_cfg("train", overrides, tmp_path).trainer.max_epochs == epochs


# -- item 11: the GAN-VAE preset's loss weights -------------------------------------------------------------
def test_ganvae_preset_losses_on_a_hand_computed_case(monkeypatch, tmp_path):
    """experiment=ganvae_cifar10 with the networks replaced by constants: mu = e_1, log sigma^2 = 0
    (KL = 1/2 for every input), a decoder whose (linear) output is 0, inputs 0.5 in all D = 3072
    dimensions. Reconstruction = the plain sum of squares 3072 / 4 = 768 (not 5x that, as with
    sigma2 = 0.1; not 0, as through a sigmoid); the fakes (both all-zero images) reconstruct exactly.
    Encoder: (768 + 1/2) / D + 1/4 * 2 exp(-2 (0 + 256 * 1/2) / D); decoder: (768 + 1/2 + 1e-8 * 0) / D."""
    from ood_lightning.run.build import build_model

    cfg = compose_cfg("train", ["experiment=ganvae_cifar10"], tmp_path)
    model = build_model(cfg, num_classes=10).train()
    assert isinstance(model, GANVAE) and model.num_dims == 3072
    mu = torch.zeros(1, 128)
    mu[0, 0] = 1.0
    monkeypatch.setattr(model, "encode", lambda x: (mu.expand(len(x), -1), torch.zeros(len(x), 128)))
    monkeypatch.setattr(model, "decode", lambda z: torch.zeros(len(z), 3, 32, 32) + 0 * z.sum())
    x, noise = torch.full((2, 3, 32, 32), 0.5), torch.randn(2, 128)
    d = 3072.0
    enc = model.encoder_objective(x, noise)
    torch.testing.assert_close(enc["rec"], torch.full((2,), 768.0))
    assert [float(t) for t in enc["exp_elbo"]] == pytest.approx([math.exp(-2 * 128 / d)] * 2, rel=1e-6)
    assert float(enc["loss"]) == pytest.approx(768.5 / d + 0.5 * math.exp(-2 * 128 / d), rel=1e-6)
    dec = model.decoder_objective(x, torch.zeros(2, 128), noise)
    assert float(dec["loss"]) == pytest.approx(768.5 / d, rel=1e-6)


@pytest.mark.parametrize("detach", [False, True])
def test_the_reconstruction_target_of_the_encoders_exp_elbo_keeps_its_graph_unless_detached(detach):
    """Soft-IntroVAE's code: the reconstruction fake enters the encoder detached, but as its own
    distortion target it keeps the graph back to the real batch's decoder output (and latent)."""
    model = tiny_vae(GANVAE, beta_neg=4.0, detach_rec_target=detach).train()
    x, noise = toy_images(16), torch.randn(16, 4)
    torch.manual_seed(0)
    out = model.encoder_objective(x, noise)
    (grad,) = torch.autograd.grad(out["exp_elbo"][0], out["terms"]["params"], allow_unused=True)
    if detach:
        assert grad is None
    else:
        assert grad is not None and float(grad.abs().sum()) > 0
    torch.manual_seed(0)
    other = tiny_vae(GANVAE, beta_neg=4.0, detach_rec_target=not detach)
    other.load_state_dict(model.state_dict())
    torch.manual_seed(0)  # the same draws: detaching changes gradients, not the value
    value = other.train().encoder_objective(x, noise)["loss"].detach()
    assert float(value) == pytest.approx(float(out["loss"].detach()), rel=1e-6)


# -- item 13: latents with the encoder's BN in train mode ----------------------------------------------------
def test_bn_train_latents_are_each_batch_normalised_by_its_own_statistics():
    """Encoder = one BatchNorm1d (running mean 0.3, var 2, affine identity), posterior mean = its
    first 4 outputs. Eval latents: (x - 0.3) / sqrt(2 + eps); BN-train latents of each batch b:
    (x - mean_b) / sqrt(biased var_b + eps); the running statistics stay as they were."""
    vae = tiny_vae(adapt_bn="none").eval()
    bn = nn.BatchNorm1d(81)
    bn.running_mean.fill_(0.3)
    bn.running_var.fill_(2.0)
    vae.backbone = nn.Sequential(nn.Flatten(), bn).eval()
    vae.posterior = nn.Linear(81, 8, bias=False)
    with torch.no_grad():
        vae.posterior.weight.zero_()
        vae.posterior.weight[:4, :4] = torch.eye(4)
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(20, 1, 9, 9, generator=g), 3.0 + 2.0 * torch.rand(30, 1, 9, 9, generator=g)]
    eps = bn.eps
    plain = vae.latent_means(batches)
    expected = torch.cat([(b.flatten(1)[:, :4] - 0.3) / math.sqrt(2.0 + eps) for b in batches])
    torch.testing.assert_close(plain, expected)
    train_mode = vae.latent_means(batches, bn_train=True)
    expected = torch.cat([(f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + eps)
                          for f in (b.flatten(1)[:, :4] for b in batches)])
    torch.testing.assert_close(train_mode, expected)
    assert torch.equal(bn.running_mean, torch.full((81,), 0.3)) and torch.equal(bn.running_var, torch.full((81,), 2.0))
    assert not bn.training


# -- item 14: decoder BN statistics from prior samples -------------------------------------------------------
def test_prior_bn_sets_the_decoders_statistics_to_those_of_prior_samples():
    """Inside ``prior_bn`` every decoder BN's running mean / var = the equal-weight average over the
    batches of the per-channel mean / unbiased variance of its input when the decoder (BN in train
    mode) decodes z ~ N(0, I) drawn as the method draws them (seeded generator); computed here on a
    copy through forward pre-hooks. The encoder's statistics do not move and the encoder is not run;
    on exit the decoder's own statistics are back."""
    torch.manual_seed(0)
    vae = tiny_vae()
    vae.train()
    for _ in range(3):  # give every BN running statistics of its own (posterior codes)
        with torch.no_grad():
            vae.elbo_terms(toy_images(32))
    vae.eval()
    enc_before, dec_before = bn_state(batch_norms(vae.backbone)), bn_state(batch_norms(vae.decoder))

    copy_dec = copy.deepcopy(vae.decoder).train()
    inputs = {i: [] for i, _ in enumerate(batch_norms(copy_dec))}
    for i, m in enumerate(batch_norms(copy_dec)):
        m.register_forward_pre_hook(lambda mod, args, i=i: inputs[i].append(args[0].detach()))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(3):
            copy_dec(torch.randn(16, 4, generator=g))
    assert len(inputs) >= 2

    calls = []
    vae.backbone.register_forward_hook(lambda *a: calls.append(1))
    with vae.prior_bn(batches=3, batch_size=16, seed=5):
        for i, m in enumerate(batch_norms(vae.decoder)):
            dims = [d for d in range(inputs[i][0].dim()) if d != 1]
            mean = torch.stack([a.mean(dims) for a in inputs[i]]).mean(0)
            var = torch.stack([a.var(dims, unbiased=True) for a in inputs[i]]).mean(0)
            torch.testing.assert_close(m.running_mean, mean)
            torch.testing.assert_close(m.running_var, var)
            assert int(m.num_batches_tracked) == 3 and not m.training
        for now, before in zip(bn_state(batch_norms(vae.backbone)), enc_before):
            assert all(torch.equal(now[k], before[k]) for k in before)
    assert not calls
    for now, before in zip(bn_state(batch_norms(vae.decoder)), dec_before):
        assert all(torch.equal(now[k], before[k]) for k in before)
