"""Decoder likelihoods p(x|z) for 8-bit images: what a VAE's likelihood (and so its OOD
score) means depends on this choice, which is why it is a config option.

Every likelihood returns the log-*probability* of the 8-bit image (a sum over pixels and
channels), so that bits/dim = -log P(x) / (D ln 2) is comparable across choices:

* :class:`GaussianFixedVariance` - N(x; mu, sigma^2) with fixed sigma^2 (0.1 by default, as
  in the seed thesis' Fig. 3.1) on [0, 1]-scaled inputs; a continuous density, turned into
  a probability of the pixel's bin by its width 1/256 (log P = log p - D ln 256).
* :class:`DiscretizedLogistic` - the mass a logistic(mu, s) puts on the pixel's bin
  [k/256, (k+1)/256), with the edge bins taking the tails (PixelCNN++, Salimans et al. 2017).
* :class:`Categorical256` - a 256-way softmax per sub-pixel (PixelRNN's output layer).

Inputs are the data module's floats in [0, 1]: ``(k + u) / 256`` when dequantised for
training, ``k / 255`` at evaluation. ``floor(256 x)`` recovers the integer k in both cases,
so the discrete likelihoods see the same bin either way.

The decoder outputs ``params_per_channel * C`` channels ("params"); ``mean(params)`` is the
expected image in [0, 1] (what reconstructions and samples show, and what a GAN-VAE feeds
back to its encoder as a fake), ``sample(params)`` draws an 8-bit image (scaled to [0, 1]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError

LOG_256 = math.log(256.0)

#: the Gaussian mean as a function of the decoder output (``method.output``)
OUTPUTS = ("sigmoid", "linear")


def to_bins(x: Tensor) -> Tensor:
    """[0, 1] floats -> integer pixel values 0..255 (see the module docstring)."""
    return torch.floor(x.float() * 256.0).clamp_(0, 255).long()


class PixelLikelihood(nn.Module):
    """Base class: ``log_prob(params, x) -> [N]`` (log P of 8-bit x, summed over dimensions)."""

    params_per_channel: int = 1

    #: supremum of the per-dimension log-probability (0 for discrete likelihoods); a
    #: likelihood's "distortion" D * max - log P(x) is >= 0 and 0 for a perfect fit
    max_log_prob_per_dim: float = 0.0

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, params: Tensor) -> Tensor:
        raise NotImplementedError

    def distortion(self, params: Tensor, x: Tensor) -> Tensor:
        """-log P(x) minus its minimum: the reconstruction error without the constant."""
        return x[0].numel() * self.max_log_prob_per_dim - self.log_prob(params, x)


class GaussianFixedVariance(PixelLikelihood):
    """N(x; mu(params), sigma2) per sub-pixel, times the bin width 1/256. ``output``: the mean is
    ``sigmoid`` of the decoder's output (in [0, 1]) or the ``linear`` output itself (Soft-IntroVAE's
    decoder ends in a plain conv). With sigma2 = 0.5 the distortion is the plain sum of squared errors."""

    params_per_channel = 1

    def __init__(self, sigma2: float = 0.1, output: str = "sigmoid"):
        super().__init__()
        if sigma2 <= 0:
            raise ConfigError(f"method.sigma2 must be > 0, got {sigma2}")
        if output not in OUTPUTS:
            raise ConfigError(f"method.output={output!r} is not one of {', '.join(OUTPUTS)}")
        self.sigma2 = float(sigma2)
        self.output = output
        self.max_log_prob_per_dim = -0.5 * math.log(2 * math.pi * self.sigma2) - LOG_256

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        sq = (x.float() - self.mean(params)).pow(2).flatten(1).sum(1)
        return x[0].numel() * self.max_log_prob_per_dim - sq / (2 * self.sigma2)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params.float()) if self.output == "sigmoid" else params.float()

    def sample(self, params: Tensor) -> Tensor:
        x = self.mean(params) + math.sqrt(self.sigma2) * torch.randn_like(params.float())
        return to_bins(x.clamp(0, 1)).float() / 255.0


class DiscretizedLogistic(PixelLikelihood):
    """Logistic(mu = sigmoid(p0), log s = p1) integrated over the pixel's bin."""

    params_per_channel = 2

    def __init__(self, min_log_scale: float = -7.0, max_log_scale: float = 7.0):
        super().__init__()
        self.min_log_scale, self.max_log_scale = float(min_log_scale), float(max_log_scale)

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        p = params.float()
        c = p.shape[1] // 2
        return torch.sigmoid(p[:, :c]), p[:, c:].clamp(self.min_log_scale, self.max_log_scale)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        mu, log_s = self._split(params)
        k = to_bins(x).float()
        inv_s = torch.exp(-log_s)
        upper = ((k + 1) / 256.0 - mu) * inv_s  # a
        lower = (k / 256.0 - mu) * inv_s  # b
        # log(sigmoid(a) - sigmoid(b)) = logsig(a) + logsig(-b) + log(1 - exp(-(a - b))), a - b = 1 / (256 s)
        width = inv_s / 256.0
        middle = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(-width))
        first = F.logsigmoid(upper)  # k = 0 takes (-inf, 1/256)
        last = F.logsigmoid(-lower)  # k = 255 takes [255/256, inf)
        logp = torch.where(k < 0.5, first, torch.where(k > 254.5, last, middle))
        return logp.flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return self._split(params)[0]

    def sample(self, params: Tensor) -> Tensor:
        mu, log_s = self._split(params)
        u = torch.rand_like(mu).clamp(1e-5, 1 - 1e-5)
        x = mu + torch.exp(log_s) * (torch.log(u) - torch.log1p(-u))
        return to_bins(x.clamp(0, 1)).float() / 255.0


class Categorical256(PixelLikelihood):
    """A 256-way softmax per sub-pixel; ``params`` are [N, C * 256, H, W] logits (channel-major)."""

    params_per_channel = 256

    def _logits(self, params: Tensor) -> Tensor:
        n, c256, h, w = params.shape
        return params.float().view(n, c256 // 256, 256, h, w)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        logp = F.log_softmax(self._logits(params), dim=2)
        k = to_bins(x).unsqueeze(2)
        return logp.gather(2, k.expand(logp.shape[0], *k.shape[1:])).flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        probs = F.softmax(self._logits(params), dim=2)
        centres = (torch.arange(256, device=params.device, dtype=probs.dtype) + 0.5) / 256.0
        return (probs * centres.view(1, 1, 256, 1, 1)).sum(2)

    def sample(self, params: Tensor) -> Tensor:
        logits = self._logits(params).movedim(2, -1)
        k = torch.distributions.Categorical(logits=logits).sample()
        return k.float() / 255.0


LIKELIHOODS = {"gaussian": GaussianFixedVariance, "logistic": DiscretizedLogistic, "categorical": Categorical256}


def build_likelihood(name: str, sigma2: float = 0.1, output: str = "sigmoid") -> PixelLikelihood:
    """``gaussian`` (fixed ``sigma2``, mean ``output`` = sigmoid | linear), ``logistic`` (discretised) or
    ``categorical`` (256-way); the last two have their own output maps (and ignore ``sigma2``, ``output``)."""
    if name not in LIKELIHOODS:
        raise ConfigError(f"method.likelihood={name!r} is not one of {', '.join(LIKELIHOODS)}")
    if output not in OUTPUTS:
        raise ConfigError(f"method.output={output!r} is not one of {', '.join(OUTPUTS)}")
    return GaussianFixedVariance(sigma2, output) if name == "gaussian" else LIKELIHOODS[name]()
