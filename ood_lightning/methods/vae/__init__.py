"""The VAE likelihood thesis: the VAE (:mod:`.model`), the GAN-VAE, BatchNorm re-estimation and the
latent probe its report uses."""

from ood_lightning.methods.vae.ganvae import GANVAE
from ood_lightning.methods.vae.model import VAE

__all__ = ["GANVAE", "VAE"]
