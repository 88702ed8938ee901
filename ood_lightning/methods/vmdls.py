"""``method=vmdls``: Variational Metric Deep Latent Space (VMDLS) for OOD detection and open-set recognition.

**Model.** A backbone g(x) feeds a stochastic head: μ(g) and log σ²(g) (linear, d = 32 by
default) and z = μ + σ·ε. Every training batch holds B_C classes × B_N examples
(:class:`~ood_lightning.data.class_batch_sampler.ClassBatchSampler`). On the sampled z,
averaged over every valid (anchor a, positive p, negative n) triplet of the batch:

* triplet  L_t = max(0, ‖z_a − z_p‖² − ‖z_a − z_n‖² + M_t), M_t = 0.1;
* distancing  L_d = max(0, M_d − ‖z_a − z_n‖²), M_d = d, or (``distance_margin_schedule``, the
  authors' code and the preset) ramped from 0.15 by +1 per epoch from epoch 10 until it passes d;
* KL  L_KL = KL(N(μ, σ²I) ‖ N(m(y), s²I)), s² = 0.1, averaged over the batch, where m(c) is
  the mean of class c's z over the *previous* epoch.

The paper writes the objective as −L_KL + L_t + L_d, with L_KL the (negative) KL term of an
evidence lower bound. What is minimised here is the divergence itself:

    loss = kl_weight · KL + triplet_weight · L_t + distance_weight · L_d

(the authors' code also adds the KL with a + sign). **Epoch 0** has no previous-epoch class
means: until a class has one, its KL target is the running mean of its z over the current
epoch so far, this batch included (detached). Without a KL in epoch 0 the distancing term is
met by inflating σ (noise alone makes ‖z_a − z_n‖² ≈ 2dσ²) instead of separating the classes,
which we measured on MNIST; the log-variance bias starts at log s² for the same reason.
``kl_start_epoch`` > 0 switches the KL off before that epoch (the authors' code zero-initialises
the means, keeps the KL off for its first 20 epochs and weighs its per-dimension mean by 0.1,
i.e. ``kl_weight`` = 0.1 / d here). ``kl_form: monte_carlo`` is their one-sample estimate
log q(z) − log p(z) at the sampled z, and ``kl_reduction: mean`` their per-dimension mean, with
which ``kl_weight: 0.1`` is their coefficient as written).

**Classifier.** ``classify`` returns −‖μ − m_c‖² / (2s²): the log-density of the KL prior
N(m_c, s²I) up to a constant, i.e. nearest class mean in the latent space, so MSP / Energy /
ODIN apply. The paper has no cross-entropy head.

**After training** (:meth:`fit_class_gaussians`, through the scores' ``fit``: one pass over the ID training set without
augmentation) one anisotropic Gaussian per class is fitted on the feature ensemble
t = (t¹, t², t³, g, μ): average-pooled outputs of blocks 1-3, the penultimate features and the
head mean μ = μ(g), concatenated (one joint Gaussian, as in the authors' code; ``joint: false``
sums per-feature Gaussians instead). Covariances are shrunk towards their diagonal so that dead
units do not make them singular. Scores, higher = ID:

* ``vmdls_b`` = ℓ(t) = max_c log N(t; μ_c, Σ_c);
* ``vmdls`` = ℓ − (w − 1) · max(M − ℓ, 0), with w = ‖t¹(x) − t¹(x̂)‖² / mean over ID training data,
  x̂ the reconstruction of x by a plain convolutional autoencoder, and M = max ℓ over ID training
  data + ``reference_margin``. For ℓ ≤ M this is M + w·(ℓ − M), which ranks exactly as the
  authors' (ℓ − M)·w: the log-likelihood gap to the reference is stretched by the reconstruction
  error. With w ≡ 1 (``autoencoder: null``) VMDLS equals VMDLS_b.
* ``ensemble_ablation`` (paper Table 5): the same two scores on μ alone, (g, μ), (t³, g, μ), ...:
  ``vmdls_b_mu``, ``vmdls_b_mu_g``, ... and, weighted with each set's own M, ``vmdls_mu``,
  ``vmdls_mu_g``, ... (the table's VMDLS rows).

**Autoencoder.** A separate component (``method.autoencoder``), trained in the same run on the
same (preprocessed) batches with an ℓ2 loss and its own optimiser; its parameters are disjoint
from the model's and its input carries no gradient, so it does not affect the latent space.
w is computed per input during the evaluation pass (:meth:`pass_values`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.data.class_batch_sampler import ClassBatchSampler
from ood_lightning.methods.base import OODMethod
from ood_lightning.nn.modes import eval_mode
from ood_lightning.scoring.api import FitData, Outputs, Scorer, pool

#: short names of ensemble members, for the feature-ablation scores
_SHORT = {"mu": "mu", "penultimate": "g", "block1": "t1", "block2": "t2", "block3": "t3", "block4": "t4"}


# ---------------------------------------------------------------------------------- losses
#: elements of one [anchors, B, B] block of the triplet hinge (16M floats: 64 MiB)
_TRIPLET_CHUNK = 1 << 24


def triplet_losses(z: Tensor, y: Tensor, triplet_margin: float, distance_margin: float) -> tuple[Tensor, Tensor]:
    """(L_t, L_d) averaged over every valid triplet (a, p, n): y_a = y_p, a ≠ p, y_n ≠ y_a.

    Squared Euclidean distances. Masked sums over (anchor, positive, negative) in chunks of
    anchors of at most ``_TRIPLET_CHUNK`` elements, so memory stays bounded and nothing depends
    on the data's values on the host (no ``nonzero``, no ``if count == 0``: no GPU sync).
    Zero (with a graph) when the batch has no valid triplet.
    """
    d = (z[:, None, :] - z[None, :, :]).pow(2).sum(-1)  # [B, B]
    same = y[:, None] == y[None, :]
    neg = (~same).to(d.dtype)
    pos = (same & ~torch.eye(len(y), dtype=torch.bool, device=y.device)).to(d.dtype)
    n_pos, n_neg = pos.sum(1), neg.sum(1)  # per anchor
    count = (n_pos * n_neg).sum().clamp(min=1.0)
    # L_d: each (a, n) term appears once per positive of a
    l_d = (n_pos[:, None] * neg * F.relu(distance_margin - d)).sum() / count
    chunk = max(1, _TRIPLET_CHUNK // max(len(y) ** 2, 1))
    l_t = d.new_zeros(())
    for s in range(0, len(y), chunk):
        d_c, pos_c, neg_c = d[s:s + chunk], pos[s:s + chunk], neg[s:s + chunk]
        hinge = F.relu(d_c[:, :, None] - d_c[:, None, :] + triplet_margin)  # [a, p, n]
        l_t = l_t + (pos_c[:, :, None] * neg_c[:, None, :] * hinge).sum()
    return l_t / count, l_d


def class_kl(mu: Tensor, logvar: Tensor, means: Tensor, prior_var: float) -> Tensor:
    """Mean over the batch of KL(N(μ, diag σ²) ‖ N(m, s²I)), summed over latent dimensions.

    ``means`` holds each sample's target m(y_i) ([B, d]).
    """
    log_ratio = torch.log(torch.as_tensor(prior_var, dtype=mu.dtype, device=mu.device)) - logvar
    per_dim = 0.5 * (log_ratio + (logvar.exp() + (mu - means).pow(2)) / prior_var - 1.0)
    return per_dim.sum(1).mean()


def class_kl_monte_carlo(z: Tensor, mu: Tensor, logvar: Tensor, means: Tensor, prior_var: float,
                         reduction: str = "sum") -> Tensor:
    """The authors' one-sample estimate of the same KL: log q(z) − log N(z; m, s²I) at the sampled z,
    summed (``reduction="sum"``, an unbiased estimate of :func:`class_kl`) or averaged (``"mean"``,
    their code) over latent dimensions, then averaged over the batch."""
    log_q = -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp())
    log_p = -0.5 * (math.log(2 * math.pi * prior_var) + (z - means).pow(2) / prior_var)
    per_dim = log_q - log_p
    return (per_dim.sum(1) if reduction == "sum" else per_dim.mean(1)).mean()


def reconstruction_weighted(loglik: Tensor, w: Tensor, reference: float | Tensor) -> Tensor:
    """VMDLS = ℓ − (w − 1)·max(M − ℓ, 0): M + w·(ℓ − M) below the reference M, ℓ above it.

    Increasing in ℓ for any w > 0, decreasing in w below M, and exactly ℓ when w ≡ 1.
    """
    return loglik - (w.to(loglik.dtype) - 1.0) * F.relu(reference - loglik)


# ---------------------------------------------------------------------------------- modules
#: checkpoint entry of the current epoch's z sums and counts (for a mid-epoch resume)
_EPOCH_Z = "vmdls_epoch_z"


def _margin_schedule(spec: Mapping[str, float] | None) -> tuple[float, float, int] | None:
    """(start, step, from_epoch) of ``method.distance_margin_schedule``, checked; None = fixed M_d."""
    if spec is None:
        return None
    keys = {"start", "step", "from_epoch"}
    if set(spec) != keys:
        raise ConfigError(f"method.distance_margin_schedule needs exactly the keys {sorted(keys)} (or null), got {sorted(spec)}")
    start, step, first = float(spec["start"]), float(spec["step"]), int(spec["from_epoch"])
    if step <= 0 or first < 0:
        raise ConfigError(f"method.distance_margin_schedule: step must be > 0 and from_epoch >= 0, got {dict(spec)}")
    return start, step, first


class StochasticHead(nn.Module):
    """μ(g) and log σ²(g): two linear maps from the backbone features to the latent space."""

    def __init__(self, in_features: int, latent_dim: int, initial_var: float = 1.0) -> None:
        super().__init__()
        self.mu = nn.Linear(in_features, latent_dim)
        self.logvar = nn.Linear(in_features, latent_dim)
        nn.init.constant_(self.logvar.bias, math.log(initial_var))  # σ² starts near initial_var

    def forward(self, g: Tensor) -> tuple[Tensor, Tensor]:
        return self.mu(g), self.logvar(g)

    @staticmethod
    def sample(mu: Tensor, logvar: Tensor) -> Tensor:
        """z = μ + σ·ε, ε ~ N(0, I) (reparameterised)."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class NearestClassMean(nn.Module):
    """Logits −‖μ − m_c‖² / (2s²) from the class means of the latent space (buffers, checkpointed)."""

    def __init__(self, num_classes: int, latent_dim: int, prior_var: float) -> None:
        super().__init__()
        self.prior_var = float(prior_var)
        self.register_buffer("means", torch.zeros(num_classes, latent_dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    def forward(self, mu: Tensor) -> Tensor:
        return -torch.cdist(mu, self.means.to(mu.dtype)).pow(2) / (2 * self.prior_var)


class ConvAutoencoder(nn.Module):
    """A plain convolutional autoencoder: two stride-2 convolutions down, a 1×1 channel bottleneck,
    two transposed convolutions up (to the input size, odd sizes included); linear output in
    the normalised input space."""

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (32, 64), bottleneck: int = 8) -> None:
        super().__init__()
        w1, w2 = (int(w) for w in widths)
        self.down1 = nn.Conv2d(in_channels, w1, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(w1, w2, 3, stride=2, padding=1)
        self.squeeze = nn.Conv2d(w2, int(bottleneck), 1)
        self.expand = nn.Conv2d(int(bottleneck), w2, 1)
        self.up2 = nn.ConvTranspose2d(w2, w1, 3, stride=2, padding=1)
        self.up1 = nn.ConvTranspose2d(w1, in_channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h1 = F.relu(self.down1(x))
        code = self.squeeze(F.relu(self.down2(h1)))
        h = F.relu(self.up2(F.relu(self.expand(code)), output_size=h1.shape[-2:]))
        return self.up1(h, output_size=x.shape[-2:])


# ---------------------------------------------------------------------------------- Gaussians
class ClassGaussians:
    """One full-covariance Gaussian per class, in float64.

    Σ_c ← (1 − s)·Σ_c + s·diag(Σ_c) (``shrinkage`` s, towards the diagonal so that features of
    different scale keep theirs), plus a floor of 1e-6·tr(Σ_c)/D on the diagonal, so that
    singular covariances (dead units, few samples) do not crash; the floor is raised tenfold
    until the Cholesky factorisation succeeds.
    """

    def __init__(self, shrinkage: float = 0.01) -> None:
        if not 0.0 <= shrinkage <= 1.0:
            raise ConfigError(f"VMDLS shrinkage must be in [0, 1], got {shrinkage}")
        self.shrinkage = float(shrinkage)
        self.classes: Tensor | None = None
        self.means: Tensor | None = None
        self.scale_tril: Tensor | None = None
        self.log_norm: Tensor | None = None

    def fit(self, x: Tensor, labels: Tensor) -> ClassGaussians:
        x = x.to(torch.float64)
        self.classes, inverse = torch.unique(labels.to(x.device), return_inverse=True)
        d = x.shape[1]
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        means, trils = [], []
        for c in range(len(self.classes)):  # one covariance per class: a loop over classes only
            xc = x[inverse == c]
            mean = xc.mean(0)
            centred = xc - mean
            cov = centred.T @ centred / len(xc)
            cov = (1 - self.shrinkage) * cov + self.shrinkage * torch.diag(cov.diagonal())
            floor = 1e-6 * max(float(cov.diagonal().mean()), 1e-12)
            for _ in range(12):
                tril, info = torch.linalg.cholesky_ex(cov + floor * eye)
                if int(info) == 0:
                    break
                floor *= 10
            else:
                raise ConfigError(f"VMDLS: the covariance of class {int(self.classes[c])} is not positive definite even with a "
                                  f"diagonal floor; raise method.shrinkage (now {self.shrinkage}) towards 1 or give the class "
                                  "more training samples (evaluation.fit_limit)")
            means.append(mean)
            trils.append(tril)
        self.means = torch.stack(means)
        self.scale_tril = torch.stack(trils)
        logdet = 2 * self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        self.log_norm = -0.5 * (d * torch.log(torch.tensor(2 * torch.pi, dtype=x.dtype)) + logdet)
        return self

    def log_likelihood(self, x: Tensor, max_elements: int = 1 << 24) -> Tensor:
        """log N(x; μ_c, Σ_c) for every row and class: [N, C]."""
        if self.means is None:
            raise RuntimeError("ClassGaussians.log_likelihood called before fit")
        x = x.to(self.means.device, torch.float64)
        num_classes, d = self.means.shape
        chunk = max(1, max_elements // (num_classes * d))
        out = []
        for rows in x.split(chunk):
            diff = (rows[None, :, :] - self.means[:, None, :]).transpose(1, 2)  # [C, D, n]
            white = torch.linalg.solve_triangular(self.scale_tril, diff, upper=False)
            out.append((self.log_norm[:, None] - 0.5 * white.pow(2).sum(1)).T)
        return torch.cat(out) if out else x.new_zeros(0, num_classes)


# ---------------------------------------------------------------------------------- the method
class VMDLS(OODMethod):
    """Backbone + stochastic head trained with triplet, distancing and class-conditioned KL losses.

    See the module docstring for the model, losses, scores and the choices made. Optimisation
    is manual because the autoencoder has its own optimiser: one backward pass through the
    (disjoint) graphs, then one step of each optimiser; the main scheduler steps per epoch.
    """

    has_linear_head = False

    #: §4 Remark 2: the open-set threshold keeps 95% of the *training* set
    f1_threshold_split = "id_train"

    #: the classifier head of a ``method=classifier`` checkpoint does not fit this head
    loads_classifier_head = False

    def __init__(self, backbone: nn.Module, num_classes: int, optimizer: Callable[..., torch.optim.Optimizer] | None,
                 scheduler: Callable[..., Any] | None = None, *, latent_dim: int = 32, triplet_margin: float = 0.1,
                 distance_margin: float | None = None, distance_margin_schedule: Mapping[str, float] | None = None,
                 prior_var: float = 0.1, kl_start_epoch: int = 0, kl_form: str = "analytic",
                 kl_reduction: str = "sum",
                 triplet_weight: float = 1.0, distance_weight: float = 1.0, kl_weight: float = 1.0,
                 classes_per_batch: int = 10, samples_per_class: int = 40, batches_per_epoch: int | None = None,
                 sampler_seed: int = 0, layers: Sequence[str] = ("block1", "block2", "block3", "penultimate", "mu"),
                 joint: bool = True, shrinkage: float = 0.01, reference_margin: float = 1.0,
                 ensemble_ablation: bool = False, autoencoder: nn.Module | None = None,
                 autoencoder_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 reconstruction_layer: str = "block1") -> None:
        super().__init__(backbone, num_classes, optimizer, scheduler)
        if prior_var <= 0:
            raise ConfigError(f"method.prior_var must be > 0, got {prior_var}")
        if autoencoder is not None and autoencoder_optimizer is None:
            raise ConfigError("method.autoencoder is set but method.autoencoder_optimizer is null")
        self.automatic_optimization = False
        self.latent_dim = int(latent_dim)
        self.latent = StochasticHead(backbone.feature_dim, self.latent_dim, prior_var)
        self.head = NearestClassMean(num_classes, self.latent_dim, prior_var)
        self.autoencoder = autoencoder
        self.autoencoder_optimizer_factory = autoencoder_optimizer
        self.triplet_margin = float(triplet_margin)
        self.distance_margin = float(self.latent_dim if distance_margin is None else distance_margin)
        self.margin_schedule = _margin_schedule(distance_margin_schedule)
        self.prior_var = float(prior_var)
        self.kl_start_epoch = int(kl_start_epoch)
        if kl_form not in ("analytic", "monte_carlo") or kl_reduction not in ("sum", "mean"):
            raise ConfigError(f"method.kl_form must be analytic|monte_carlo and method.kl_reduction sum|mean, got "
                              f"{kl_form!r}, {kl_reduction!r}")
        if kl_form == "analytic" and kl_reduction == "mean":
            raise ConfigError("method.kl_reduction=mean is the authors' Monte-Carlo form: set method.kl_form=monte_carlo")
        self.kl_form, self.kl_reduction = kl_form, kl_reduction
        self.weights = {"triplet": float(triplet_weight), "distance": float(distance_weight), "kl": float(kl_weight)}
        self.classes_per_batch = int(classes_per_batch)
        self.samples_per_class = int(samples_per_class)
        self.batches_per_epoch = None if batches_per_epoch is None else int(batches_per_epoch)
        self.sampler_seed = int(sampler_seed)
        self.layers = list(layers)
        if not self.layers:
            raise ConfigError("method.layers must name at least one feature (e.g. [mu])")
        self.joint = bool(joint)
        self.shrinkage = float(shrinkage)
        self.reference_margin = float(reference_margin)
        self.ensemble_ablation = bool(ensemble_ablation)
        self.reconstruction_layer = reconstruction_layer
        self.register_buffer("_z_sum", torch.zeros(num_classes, self.latent_dim), persistent=False)
        self.register_buffer("_z_count", torch.zeros(num_classes), persistent=False)
        # fitted by fit_class_gaussians: [(feature names, ClassGaussians)] per score, and on which outputs
        self._gaussians: dict[str, list[tuple[list[str], ClassGaussians]]] = {}
        self._fitted_on: Outputs | None = None
        self._references: dict[str, float] = {}  # M per fitted feature set (name of its unweighted score)
        self._reference = 0.0  # M of the full ensemble
        self._w_scale = 1.0
        self._last_loglik: tuple[Outputs, dict[str, Tensor]] | None = None

    # -- data -----------------------------------------------------------------------------
    def train_batch_sampler(self, labels: Tensor) -> ClassBatchSampler:
        """B_C classes × B_N examples per batch; what the data module's training loader should use."""
        return ClassBatchSampler(labels, self.classes_per_batch, self.samples_per_class,
                                 num_batches=self.batches_per_epoch, seed=self.sampler_seed)

    def on_fit_start(self) -> None:
        """Fail before training, not after it, when a configured feature is not a backbone output."""
        if self.trainer.datamodule is not None:
            self.check_layers(tuple(self.trainer.datamodule.sample_shape))

    def check_layers(self, sample_shape: tuple[int, ...]) -> None:
        """Every name in ``layers`` (and the reconstruction layer) is an output of the backbone."""
        with eval_mode(self.backbone), torch.no_grad():
            probe = torch.zeros(1, *sample_shape, device=self.device)
            available = [*self.backbone.forward_features(probe), "mu"]
        wanted = [("method.layers", n) for n in self.layers]
        if self.autoencoder is not None:
            wanted.append(("method.reconstruction_layer", self.reconstruction_layer))
        for key, name in wanted:
            if name not in available or (key == "method.reconstruction_layer" and name == "mu"):
                raise ConfigError(f"{key} names {name!r}, which is not an output of this backbone; "
                                  f"available: {available}")

    # -- model ----------------------------------------------------------------------------
    def classify(self, features: Tensor) -> Tensor:
        return self.head(self.latent.mu(features))

    def kl_targets(self, z: Tensor, y: Tensor) -> Tensor:
        """m(c) per class [C, d]: the previous epoch's mean of z, else (epoch 0, or a class not seen
        yet) the running mean of z over this epoch so far, this batch included; no gradient."""
        z = z.detach().to(self._z_sum.dtype)
        total = self._z_sum.index_add(0, y, z)
        count = self._z_count + torch.bincount(y, minlength=self.num_classes).to(self._z_count.dtype)
        running = total / count.clamp_min(1)[:, None]
        return torch.where(self.head.seen[:, None], self.head.means, running)

    def distance_margin_at(self, epoch: int) -> float:
        """M_d of ``epoch``: fixed, or the authors' ramp (their ``UpdateMargin`` callback): M_d starts at
        ``start``; at the start of every epoch ≥ ``from_epoch`` it grows by ``step`` while it is still
        ≤ d (so it ends one step past the last value ≤ d: 0.15 → 32.15 for d = 32)."""
        if self.margin_schedule is None:
            return self.distance_margin
        start, step, first = self.margin_schedule
        margin = start
        for _ in range(first, int(epoch) + 1):
            if margin > self.distance_margin:
                break
            margin += step
        return margin

    def loss_terms(self, z: Tensor, mu: Tensor, logvar: Tensor, y: Tensor) -> dict[str, Tensor]:
        l_t, l_d = triplet_losses(z, y, self.triplet_margin, self.distance_margin_at(self.current_epoch))
        terms = {"triplet": l_t, "distance": l_d}
        if self.current_epoch >= self.kl_start_epoch:
            targets = self.kl_targets(z, y)[y].to(mu.dtype)
            if self.kl_form == "monte_carlo":
                terms["kl"] = class_kl_monte_carlo(z, mu, logvar, targets, self.prior_var, self.kl_reduction)
            else:
                terms["kl"] = class_kl(mu, logvar, targets, self.prior_var)
        else:
            terms["kl"] = mu.sum() * 0.0
        return terms

    def training_step(self, batch, batch_idx):
        x, y = batch
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        mu, logvar = self.latent(self.backbone(x))
        z = self.latent.sample(mu, logvar)
        terms = self.loss_terms(z, mu, logvar, y)
        loss = sum(self.weights[k] * v for k, v in terms.items())
        total = loss
        if self.autoencoder is not None:
            terms["reconstruction"] = F.mse_loss(self.autoencoder(x), x)
            total = loss + terms["reconstruction"]
        self.check_finite(total, terms)
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(total)
        for opt in opts:
            opt.step()
        with torch.no_grad():
            self._z_sum.index_add_(0, y, z.detach().to(self._z_sum.dtype))
            self._z_count += torch.bincount(y, minlength=self.num_classes).to(self._z_count.dtype)
        self.log_dict({"train/loss": loss, **{f"train/{k}": v for k, v in terms.items()}}, prog_bar=False,
                      on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        mu, _ = self.latent(self.backbone(x))
        acc = (self.head(mu).argmax(1) == y).float().mean()
        l_t, l_d = triplet_losses(mu[:256], y[:256], self.triplet_margin, self.distance_margin_at(self.current_epoch))
        self.log_dict({"val/acc": acc, "val/triplet": l_t, "val/distance": l_d}, prog_bar=True, on_epoch=True,
                      on_step=False, batch_size=len(y), sync_dist=True)

    def on_train_epoch_start(self) -> None:
        self._z_sum.zero_()
        self._z_count.zero_()

    def on_train_epoch_end(self) -> None:
        """This epoch's class means of z become the KL targets (and classifier) of the next."""
        z_sum = self.trainer.strategy.reduce(self._z_sum.clone(), reduce_op="sum")
        count = self.trainer.strategy.reduce(self._z_count.clone(), reduce_op="sum")
        seen = count > 0
        self.head.means[seen] = (z_sum[seen] / count[seen, None]).to(self.head.means.dtype)
        self.head.seen |= seen
        schedulers = self.lr_schedulers()
        for sch in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers is not None else []:
            sch.step()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # the epoch's z sums so far (not in the state_dict): a run resumed mid-epoch, e.g. after
        # SIGTERM, ends the epoch with the class means the uninterrupted run would have had
        checkpoint[_EPOCH_Z] = {"sum": self._z_sum.detach().cpu().clone(), "count": self._z_count.detach().cpu().clone()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if _EPOCH_Z in checkpoint:
            self._z_sum.copy_(checkpoint[_EPOCH_Z]["sum"])
            self._z_count.copy_(checkpoint[_EPOCH_Z]["count"])

    def configure_optimizers(self):
        main = [p for name, p in self.named_parameters() if not name.startswith("autoencoder.")]
        opts = [self.optimizer_factory(main)]
        if self.autoencoder is not None:
            opts.append(self.autoencoder_optimizer_factory(self.autoencoder.parameters()))
        if self.scheduler_factory is None:
            return opts
        return opts, [{"scheduler": self.scheduler_factory(opts[0]), "interval": "epoch"}]

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def pass_values(self, x: Tensor, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """w(x) = ‖t¹(x) − t¹(x̂)‖² (pooled ``reconstruction_layer``), per input; nothing without an autoencoder."""
        if self.autoencoder is None:
            return {}
        layer = self.reconstruction_layer
        t_x = pool(features[layer])
        t_hat = pool(self.backbone.forward_features(self.autoencoder(x))[layer])
        return {"vmdls_w": (t_x - t_hat).pow(2).sum(1)}

    def _stats_device(self) -> torch.device:
        return torch.device("cpu") if self.device.type == "mps" else self.device

    def _feature(self, outputs: Outputs, name: str) -> Tensor:
        if name == "mu":
            ref = self.latent.mu.weight
            mu = self.latent.mu(outputs.features.to(ref.device, ref.dtype))
            return mu.to(self._stats_device(), torch.float64)
        if name == "penultimate":
            t = outputs.features
        elif name in outputs.layers:
            t = outputs.layers[name]
        else:
            raise ConfigError(f"VMDLS feature {name!r} is not an output of this backbone; available: "
                              f"{sorted(outputs.layers) + ['mu']} (set method.layers)")
        return pool(t).to(self._stats_device(), torch.float64)

    def _fit(self, outputs: Outputs, names: list[str]) -> list[tuple[list[str], ClassGaussians]]:
        groups = [names] if self.joint else [[n] for n in names]
        labels = outputs.labels
        return [(g, ClassGaussians(self.shrinkage).fit(torch.cat([self._feature(outputs, n) for n in g], 1), labels))
                for g in groups]

    def _log_likelihood(self, outputs: Outputs, fitted: list[tuple[list[str], ClassGaussians]]) -> Tensor:
        """Σ over feature groups of log N(t_group; class c): [N, C] (one group when ``joint``)."""
        return sum(gauss.log_likelihood(torch.cat([self._feature(outputs, n) for n in g], 1)) for g, gauss in fitted)

    def _ablation_sets(self) -> dict[str, list[str]]:
        """Paper Table 5: μ alone, then adding g, t³, t², t¹ (each proper prefix of the reversed ensemble),
        keyed by their suffix ("mu", "mu_g", ...): scored as ``vmdls_b_<suffix>`` and, weighted, ``vmdls_<suffix>``."""
        if not self.ensemble_ablation:
            return {}
        rev = self.layers[::-1]
        return {"_".join(_SHORT.get(n, n) for n in rev[:k]): rev[:k] for k in range(1, len(rev))}

    def scorers(self) -> dict[str, Scorer]:
        suffixes = list(self._ablation_sets())
        names = ["vmdls_b", "vmdls", *(f"vmdls_b_{s}" for s in suffixes), *(f"vmdls_{s}" for s in suffixes)]
        return {name: VMDLSScore(name) for name in names}

    @torch.no_grad()
    def fit_class_gaussians(self, train: Outputs) -> None:
        """Class Gaussians on the ID training ensemble; the reference M and the scale of w."""
        if train.labels is None:
            raise ConfigError("VMDLS needs the class labels of the ID training outputs")
        self._fitted_on = train
        sets = {"vmdls_b": self.layers, **{f"vmdls_b_{s}": names for s, names in self._ablation_sets().items()}}
        self._last_loglik = None
        self._gaussians = {name: self._fit(train, names) for name, names in sets.items()}
        # M per feature set: each weighted score (vmdls, vmdls_<suffix>) uses its own ensemble's max ID-train ℓ
        # (kept: the training scores, for the F1 threshold, reuse these log-likelihoods)
        self._references = {name: float(ll.amax(1).max()) + self.reference_margin
                            for name, ll in self._class_log_likelihoods(train).items()}
        self._reference = self._references["vmdls_b"]
        w = train.extra.get("vmdls_w")
        self._w_scale = float(w.double().mean().clamp_min(1e-12)) if w is not None else 1.0

    @torch.no_grad()
    def own_scores(self, outputs: Outputs) -> dict[str, Tensor]:
        """``vmdls_b`` (max class log-likelihood of the ensemble) and ``vmdls`` (reconstruction-weighted);
        with ``ensemble_ablation`` also ``vmdls_b_mu``, ``vmdls_b_mu_g``, ... and their weighted ``vmdls_mu``,
        ``vmdls_mu_g``, ... (Table 5 weighs them: "VMDLS with different subsets"). Higher = ID."""
        scores = {name: ll.amax(1) for name, ll in self._class_log_likelihoods(outputs).items()}
        w = outputs.extra.get("vmdls_w")
        w = torch.ones_like(scores["vmdls_b"]) if w is None else w.to(scores["vmdls_b"].device) / self._w_scale
        for name in list(scores):
            scores["vmdls" + name.removeprefix("vmdls_b")] = reconstruction_weighted(scores[name], w, self._references[name])
        return scores

    @torch.no_grad()
    def own_predictions(self, outputs: Outputs) -> dict[str, Tensor]:
        """The paper's open-set class prediction for each score: argmax_c of its class log-likelihoods
        (``vmdls`` predicts like ``vmdls_b``: w > 0 scales all classes alike)."""
        preds = {}
        for name, ll in self._class_log_likelihoods(outputs).items():
            classes = self._gaussians[name][0][1].classes.to(ll.device)
            preds[name] = preds["vmdls" + name.removeprefix("vmdls_b")] = classes[ll.argmax(1)].cpu()
        return preds

    def _class_log_likelihoods(self, outputs: Outputs) -> dict[str, Tensor]:
        """[N, C] per fitted score; the last set's are kept, as scores and predictions both need them."""
        if not self._gaussians:
            raise RuntimeError("VMDLS scored before fit_class_gaussians(train_outputs)")
        if self._last_loglik is None or self._last_loglik[0] is not outputs:
            self._last_loglik = (outputs, {name: self._log_likelihood(outputs, fitted)
                                           for name, fitted in self._gaussians.items()})
        return self._last_loglik[1]


class VMDLSScore(Scorer):
    """One of VMDLS's scores (``vmdls_b``, ``vmdls``, an ablation ``vmdls_b_mu...``), with the paper's
    own open-set class prediction (argmax of its class log-likelihoods). The class Gaussians are
    fitted once per training set, whichever of these scores is fitted first."""

    needs_classifier = False

    def __init__(self, name: str) -> None:
        self.name = name

    def fit(self, model: VMDLS, data: FitData) -> VMDLSScore:
        if model._fitted_on is not data.train:
            model.fit_class_gaussians(data.train)
        return self

    def score(self, model: VMDLS, outputs: Outputs) -> Tensor:
        return model.own_scores(outputs)[self.name]

    def predict(self, model: VMDLS, outputs: Outputs) -> Tensor:
        return model.own_predictions(outputs)[self.name]
