"""The VAE's training objective and its bits/dim against the thesis' definitions.

Thesis Eq. 2.2: ELBO = E_q[log p(x|z)] − D_KL(q(z|x) ‖ p(z)), a β-VAE weighs the KL by β (§3.3.4:
"the objective of a β-VAE is 1/(2σ²) reconst + β KLD"); §3.3.2: BPD is −log p(x) in bits divided by
the dimensions. Truths: the step's loss recomputed here from the same seeded ε with
``torch.distributions`` (Normal likelihood of fixed variance times the 1/256 bin width of an 8-bit
pixel, closed-form KL against N(0, I));
bits/dim of a likelihood of exactly −D·ln 2 nats is 1.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from tests.test_vae import tiny_vae, toy_images

pytestmark = pytest.mark.usefixtures("single_thread")


def test_training_loss_is_the_negative_beta_elbo_per_dimension() -> None:
    torch.manual_seed(0)
    model = tiny_vae(beta=2.0, sigma2=0.1, output="linear")
    model.log_dict = lambda *args, **kwargs: None
    x = toy_images(16)
    model.train()
    torch.manual_seed(3)
    loss = model.training_step((x, torch.zeros(16, dtype=torch.long)), 0)
    torch.manual_seed(3)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        mean = model.decode(z)
        # the probability of each 8-bit pixel's bin: the Gaussian density times the bin width 1/256
        log_px = Normal(mean, 0.1 ** 0.5).log_prob(x).flatten(1).sum(1) - x[0].numel() * math.log(256)
        kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
        expected = -(log_px - 2.0 * kl).mean() / x[0].numel()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    d = x[0].numel()
    torch.testing.assert_close(model.bits_per_dim(torch.tensor([-d * math.log(2), -2 * d * math.log(2)])),
                               torch.tensor([1.0, 2.0]))
