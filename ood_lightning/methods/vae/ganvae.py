"""``method=ganvae``: the VAE of ``method=vae`` trained adversarially, Soft-IntroVAE style.

Objective implemented: **Soft-IntroVAE** (Daniel & Tamar, CVPR 2021), the soft-exponential
successor of IntroVAE (Huang et al., NeurIPS 2018). The encoder doubles as the
discriminator: it is trained to give real inputs a high ELBO and generated inputs - decoded
prior samples *and reconstructions* of the real batch - a low one, while the decoder is
trained to make both kinds of fakes look real to the encoder (low KL, reconstructable).
With s = 1/D (per-dimension scale), ELBO pieces from the configured likelihood
(``rec`` = its distortion D * max log p - log p(x|z) >= 0, which for the Gaussian is
||x - x_hat||^2 / 2 sigma^2):

    encoder:  s (b_rec rec(x) + b_kl KL(x))
              + 1/(2 alpha) sum_{f in {fake, recon}} E exp(-alpha s (b_rec rec(f) + b_neg KL(f)))
    decoder:  s (b_rec rec(x) + b_kl (KL(fake) + KL(recon)) / 2
              + gamma_r b_rec (rec(fake) + rec(recon)) / 2)

(alpha = 2 as in the paper's code). The reconstruction fake enters the encoder detached but, as in
the paper's code, its distortion target keeps its graph (``detach_rec_target=false``), so the
exp-ELBO term also reaches the encoder through the real batch's latent. With the preset's
Gaussian sigma2 = 0.5, rec is the code's plain sum of squared errors (1 / 2 sigma^2 = 1).

Why this one rather than IntroVAE's hinge [m - KL(fake)]^+ on the KL alone: the hinge needs a
margin m tuned per dataset and makes training unstable once fakes pass it, whereas the soft
exponential has no threshold, gives a smooth gradient everywhere, and its optimum is provably
the data distribution (the paper's analysis); the encoder still ends up scoring fakes by their
(negative) ELBO, which is the likelihood-like quantity whose OOD behaviour we study.

Everything else - architecture, likelihoods, IWAE scores, BatchNorm adaptation, ELBO
components, pictures, probe - is :class:`~ood_lightning.methods.vae.model.VAE`'s. Two optimisers
(encoder + posterior head, decoder) built from the same ``optimizer`` config; the first
``vae_warmup_epochs`` epochs are plain (beta-)VAE training. Note for the BatchNorm study:
as in the paper's code, the encoder runs in training mode on real, reconstructed and
generated batches alike, so its BatchNorm running statistics average over all three.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ood_lightning.methods.vae.model import VAE, gaussian_kl_terms


def encoder_loss(s: float, rec_real: Tensor, kl_real: Tensor, fakes: list[tuple[Tensor, Tensor]], beta_rec: float,
                 beta_kl: float, beta_neg: float, alpha: float) -> tuple[Tensor, list[Tensor]]:
    """The encoder's objective (module docstring) from per-input pieces: s (b_rec rec + b_kl KL) of the
    real batch + 1/(2 alpha) sum over ``fakes`` [(rec_f, KL_f)] of E exp(-alpha s (b_rec rec_f + b_neg KL_f)).
    Returns (loss, the exp-ELBO terms)."""
    exp_elbo = [torch.exp(-alpha * s * (beta_rec * rec_f + beta_neg * kl_f)).mean() for rec_f, kl_f in fakes]
    return s * (beta_rec * rec_real + beta_kl * kl_real).mean() + 0.5 / alpha * sum(exp_elbo), exp_elbo


def decoder_loss(s: float, rec_real: Tensor, kls: list[Tensor], recs: list[Tensor], beta_rec: float, beta_kl: float,
                 gamma_r: float) -> Tensor:
    """The decoder's objective: s (b_rec rec(x) + b_kl mean of the fakes' KLs + gamma_r b_rec mean of their recs)."""
    n = len(kls)
    return s * (beta_rec * rec_real + beta_kl * sum(kls) / n + gamma_r * beta_rec * sum(recs) / n).mean()


class GANVAE(VAE):
    """Soft-IntroVAE on the VAE's networks (manual optimisation, two optimisers)."""

    def __init__(self, *args, beta_rec: float = 1.0, beta_kl: float = 1.0, beta_neg: float = 256.0,
                 gamma_r: float = 1e-8, alpha: float = 2.0, vae_warmup_epochs: int = 0, detach_rec_target: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.beta_rec, self.beta_kl, self.beta_neg = float(beta_rec), float(beta_kl), float(beta_neg)
        self.gamma_r, self.alpha = float(gamma_r), float(alpha)
        self.vae_warmup_epochs = int(vae_warmup_epochs)
        self.detach_rec_target = bool(detach_rec_target)

    def encoder_parameters(self):
        return [*self.backbone.parameters(), *self.posterior.parameters()]

    def configure_optimizers(self):
        opts = [self.optimizer_factory(self.encoder_parameters()), self.optimizer_factory(self.decoder.parameters())]
        if self.scheduler_factory is None:
            return opts
        return opts, [self.scheduler_factory(o) for o in opts]

    def _posterior_sample(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        return mu, logvar, self.reparameterize(mu, logvar)

    def _fake_elbo_loss(self, images: Tensor, target: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(distortion, KL) per input of ``images`` (fed in detached) under the encoder and decoder; the
        distortion is measured against ``target`` (default: the detached images)."""
        mu, logvar, z = self._posterior_sample(images.detach())
        target = images.detach() if target is None else target
        return self.likelihood.distortion(self.decode(z), target), gaussian_kl_terms(mu, logvar)["kl"]

    def encoder_objective(self, x: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """The encoder's loss on real ``x`` and prior ``noise`` (its fakes: decoded noise and the
        reconstructions of ``x``). The reconstructions enter the encoder detached; as the distortion's
        target they keep their graph unless ``detach_rec_target`` (Soft-IntroVAE's code keeps it, so
        the encoder also gets a gradient through the real batch's latent there)."""
        s = 1.0 / self.num_dims
        with torch.no_grad():
            fake = self.likelihood.mean(self.decode(noise))
        t = self.elbo_terms(x)
        rec_real = self.likelihood.distortion(t["params"], x)
        recon = self.likelihood.mean(t["params"])
        fakes = [self._fake_elbo_loss(recon, recon.detach() if self.detach_rec_target else recon),
                 self._fake_elbo_loss(fake)]
        loss, exp_elbo = encoder_loss(s, rec_real, t["kl"], fakes, self.beta_rec, self.beta_kl, self.beta_neg,
                                      self.alpha)
        return {"loss": loss, "exp_elbo": exp_elbo, "rec": rec_real, "terms": t}

    def decoder_objective(self, x: Tensor, z_real: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """The decoder's loss: reconstruct ``x`` from its (detached) latents ``z_real``, and make the
        reconstructions and the decoded ``noise`` look real to the encoder (low KL, reconstructable)."""
        fake = self.likelihood.mean(self.decode(noise))
        params = self.decode(z_real.detach())
        rec_real = self.likelihood.distortion(params, x)
        recon = self.likelihood.mean(params)
        kls, recs = [], []
        for images in (recon, fake):
            mu, logvar, z = self._posterior_sample(images)  # gradients reach the decoder through the images
            kls.append(gaussian_kl_terms(mu, logvar)["kl"])
            recs.append(self.likelihood.distortion(self.decode(z.detach()), images.detach()))
        loss = decoder_loss(1.0 / self.num_dims, rec_real, kls, recs, self.beta_rec, self.beta_kl, self.gamma_r)
        return {"loss": loss, "kls": kls}

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_e, opt_d = self.optimizers()
        s = 1.0 / self.num_dims
        if self.current_epoch < self.vae_warmup_epochs:
            t = self.elbo_terms(x)
            loss = s * (self.beta_rec * self.likelihood.distortion(t["params"], x) + self.beta_kl * t["kl"]).mean()
            self.check_finite(loss, {"vae": loss})
            opt_e.zero_grad()
            opt_d.zero_grad()
            self.manual_backward(loss)
            opt_e.step()
            opt_d.step()
            self._log(t, {"train/loss": loss})
            return

        noise = torch.randn(len(x), self.latent_dim, device=x.device)
        # ---- encoder: real ELBO up, fake and reconstruction ELBO down (soft exponential)
        self.toggle_optimizer(opt_e)
        enc = self.encoder_objective(x, noise)
        t, loss_e, exp_elbo = enc["terms"], enc["loss"], enc["exp_elbo"]
        self.check_finite(loss_e, {"loss_e": loss_e, "rec": enc["rec"].mean(), "kl": t["kl"].mean()})
        opt_e.zero_grad()
        self.manual_backward(loss_e)
        opt_e.step()
        self.untoggle_optimizer(opt_e)

        # ---- decoder: reconstruct the real batch, make fakes and reconstructions look real
        self.toggle_optimizer(opt_d)
        dec = self.decoder_objective(x, t["z"], noise)
        loss_d, kls = dec["loss"], dec["kls"]
        self.check_finite(loss_d, {"loss_d": loss_d, "kl_fake": kls[1].mean(), "kl_recon": kls[0].mean()})
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        self._log(t, {"train/loss_e": loss_e, "train/loss_d": loss_d, "train/kl_fake": kls[1].mean(),
                      "train/kl_recon": kls[0].mean(), "train/exp_elbo_fake": exp_elbo[1],
                      "train/kl_diff": kls[1].mean() - t["kl"].mean()})

    def _log(self, t: dict, extra: dict) -> None:
        self.log_dict({"train/bpd": self.bits_per_dim(t["elbo"]).mean().detach(), "train/kl": t["kl"].mean().detach(),
                       **{k: v.detach() for k, v in extra.items()}},
                      prog_bar=True, on_step=False, on_epoch=True, batch_size=len(t["elbo"]))

    def on_train_epoch_end(self) -> None:
        schedulers = self.lr_schedulers()
        for sched in schedulers if isinstance(schedulers, list) else ([schedulers] if schedulers else []):
            sched.step()

