"""LSGM (Xu, Zhu, Li, Xu, "Joint Distribution across Representation Space for OOD Detection").

A network's inference leaves a *trace* through its representation spaces: one pooled
feature vector per main block. LSGM models the ID traces generatively, as a hidden Markov
model over layers. The hidden state at layer i is the component of a Gaussian mixture
fitted to that layer's ID features; the emission is that component's Gaussian density;
transitions between consecutive layers' components are counted from the ID training
traces. An input is scored by the joint log-likelihood of its whole trace,

    log p(h_1..h_m) = log Σ_{z_1..z_m} π(z_1) p(h_1|z_1) Π_i A_i(z_i, z_{i+1}) p(h_{i+1}|z_{i+1}),

computed with the forward algorithm in log space (O(m·k²) per input, never enumerating the
k^m traces). Each layer's marginal may look ID while the *combination* across layers does
not; summing per-layer likelihoods (``joint=False``, the "per-layer GMM" baseline) misses
exactly that.

Choices made here (each reachable from the config):

* The paper's features are the raw pooled stage outputs (the default). Optionally they are
  standardised per layer with the ID training mean/std (``standardize``) and projected by
  PCA (``pca_dim``) to keep full covariances of wide layers tractable. Likelihoods are those
  of the transformed features; the constant Jacobian does not change any ranking.
* ``mixture="dirichlet"`` (the paper's default) is scikit-learn's truncated
  Dirichlet-process mixture with ``n_components`` as the truncation level; ``"gmm"`` is
  plain EM with exactly ``n_components``. ``n_components="paper"`` is the paper's value for
  the ID dataset, keyed by its number of classes (50 / 100 / 200 for CIFAR-10 / CIFAR-100 /
  TinyImageNet; 50 for any other class count); ``"auto"`` = 5 × number of classes. Both are scored as plug-in densities from the
  fitted ``weights_``, ``means_`` and ``precisions_cholesky_`` (public attributes), so the
  Dirichlet mixture is scored by its point estimate rather than by sklearn's variational
  ``score_samples``. ``min_weight`` can drop the truncation's near-empty components.
* ``backend="torch"`` fits the ``"gmm"`` mixture with our torch EM
  (:class:`~ood_lightning.detectors.torch_gmm.TorchGaussianMixture`: full covariance, batched,
  float64 on the model's device, scikit-learn's k-means initialisation), the same EM as
  scikit-learn's ``GaussianMixture`` (equal to round-off from the same start), fast enough for
  the paper's setting of raw, un-projected layers (``standardize=False, pca_dim=None``).
* Transitions are counted from hard traces (argmax posterior per layer, the paper's
  trace; ``transitions="hard"``) or as expected counts Σ_n γ_i(n)ᵀγ_{i+1}(n)
  (``"soft"``; exact, as each layer's posterior depends on that layer only). Counts get
  additive smoothing and rows are normalised, so an unseen transition is unlikely but not
  impossible. The paper gives no smoothing. ``smoothing_per="row"`` spreads
  ``transition_smoothing`` pseudo-counts over each whole row (``s / k_{i+1}`` per cell), so
  with few samples per row and many components the counts still dominate; ``"cell"`` adds
  ``s`` to every cell (Laplace), which swamps a row of c counts once k ≫ c (CIFAR-100: 500
  components, ~40 counts per row -> near-uniform rows).
* Mixture weights at deeper layers (``mixture_weights``): the paper contradicts itself.
  Its Eqs. 2/4 multiply P(z_i | Φ_i) in at *every* layer (``"every_layer"``); its §3.3
  recursion α_i = P(x_i|z_i) Σ P(z_i|z_{i-1}) α_{i-1} uses them only through the initial
  distribution (``"first_layer"``, the default: it is the algorithm the paper says it
  computes, and it is a normalised HMM likelihood, whereas Eq. 4 counts each deeper
  layer's state prior twice, once in the transition and once in the weight).
* The initial distribution is the first layer's mixture weights (``initial="weights"``,
  so one layer reduces to that layer's GMM) or counted like the transitions
  (``"counted"``).

Cost: fitting a full-covariance mixture is O(max_iter · N · k · D²) per layer on the CPU
(sklearn), e.g. minutes for N=2000, k=50, D=128; on CIFAR-sized layers use ``pca_dim``,
``covariance_type="diag"`` or fewer fit samples. Scoring is O(N · Σ_l k·D_l² + N · m · k²).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.scoring.api import FeatureModel, FitData, Outputs, Scorer, StateValue, layer_selection, pool

PENULTIMATE = "penultimate"
#: the paper's components per layer (§4.3), by the ID dataset's number of classes:
#: CIFAR-10, CIFAR-100, TinyImageNet; other datasets get the CIFAR-10 value
PAPER_COMPONENTS = {10: 50, 100: 100, 200: 200}
log = logging.getLogger(__name__)
#: elements of one [chunk, k_i, k_{i+1}] block when a transition step falls back to logsumexp
_CHUNK_ELEMENTS = 1 << 24


def _layer_features(outputs: Outputs, name: str) -> Tensor:
    """Pooled features of one layer; "penultimate" falls back to ``outputs.features``."""
    if name in outputs.layers:
        return pool(outputs.layers[name])
    if name == PENULTIMATE:
        return outputs.features
    raise KeyError(f"LSGM layer {name!r} not in outputs (available: {sorted(outputs.layers)})")


def _log_matmul_exp(log_a: Tensor, log_b: Tensor) -> Tensor:
    """log(exp(log_a) @ exp(log_b)) for [N, J] and [J, K], as a matmul, without overflow.

    Shifting rows of ``log_a`` and columns of ``log_b`` by their maxima makes the largest
    term of every sum exp(0)·exp(≤0), so a result can only underflow when every term is
    ~700 nats below those maxima (only possible with zero transition probabilities);
    such rows are recomputed with an exact, chunked logsumexp.
    """
    row = log_a.amax(1, keepdim=True)
    row = torch.where(torch.isfinite(row), row, torch.zeros_like(row))
    col = log_b.amax(0, keepdim=True)
    col = torch.where(torch.isfinite(col), col, torch.zeros_like(col))
    out = torch.log((log_a - row).exp() @ (log_b - col).exp()) + row + col
    bad = torch.isinf(out).any(1).nonzero().flatten()
    if len(bad):
        chunk = max(1, _CHUNK_ELEMENTS // max(1, log_b.numel()))
        for start in range(0, len(bad), chunk):
            idx = bad[start:start + chunk]
            out[idx] = torch.logsumexp(log_a[idx, :, None] + log_b[None], dim=1)
    return out


def forward_algorithm(
    log_init: Tensor, log_trans_list: Sequence[Tensor], log_emissions_list: Sequence[Tensor]
) -> Tensor:
    """Log-likelihood [N] of each input's whole trace under an HMM over layers.

    Args:
        log_init: log π [k_1], the first layer's state distribution.
        log_trans_list: m−1 matrices log A_i [k_i, k_{i+1}], rows = state at layer i.
        log_emissions_list: m matrices log p(h_i | z_i = j) [N, k_i].

    Layers may have different numbers of states. α_1 = π·p(h_1|z_1) and
    α_{i+1}(k) = Σ_j α_i(j) A_i(j, k) · p(h_{i+1}|k), all in log space.
    """
    if len(log_emissions_list) == 0:
        raise ValueError("forward_algorithm needs at least one layer of emissions")
    if len(log_trans_list) != len(log_emissions_list) - 1:
        raise ValueError(f"forward_algorithm: {len(log_emissions_list)} layers need "
                         f"{len(log_emissions_list) - 1} transition matrices, got {len(log_trans_list)}")
    first = log_emissions_list[0]
    if log_init.shape != first.shape[1:]:
        raise ValueError(f"forward_algorithm: log_init {tuple(log_init.shape)} does not match "
                         f"{first.shape[1]} states of the first layer")
    log_alpha = first + log_init.to(first)
    for i, (log_trans, log_em) in enumerate(zip(log_trans_list, log_emissions_list[1:])):
        if log_trans.shape != (log_alpha.shape[1], log_em.shape[1]):
            raise ValueError(f"forward_algorithm: transition {i} has shape {tuple(log_trans.shape)}, "
                             f"expected {(log_alpha.shape[1], log_em.shape[1])}")
        log_alpha = _log_matmul_exp(log_alpha, log_trans.to(log_alpha)) + log_em.to(log_alpha)
    return torch.logsumexp(log_alpha, dim=1)


def gaussian_log_densities(x: Tensor, means: Tensor, precisions_cholesky: Tensor, covariance_type: str) -> Tensor:
    """log N(x; μ_k, Σ_k) [N, K] from means [K, D] and Cholesky factors L_k of Σ_k⁻¹ = L_k L_kᵀ.

    The factors are scikit-learn's ``precisions_cholesky_``: [K, D, D] for "full" and
    [K, D] for "diag". Components are looped (not broadcast) so memory stays O(N·D).
    """
    n, d = x.shape
    const = -0.5 * d * math.log(2 * math.pi)
    if covariance_type == "diag":
        p = precisions_cholesky**2  # diagonal precisions [K, D]
        maha = (x**2) @ p.T - 2 * x @ (means * p).T + (means**2 * p).sum(1)
        log_det = torch.log(precisions_cholesky).sum(1)
        return const + log_det - 0.5 * maha.clamp_min(0)
    if covariance_type != "full":
        raise ConfigError(f"detectors.<name>: LSGM covariance_type must be 'full' or 'diag', got {covariance_type!r}")
    out = torch.empty(n, len(means), dtype=x.dtype, device=x.device)
    for k, (mu, chol) in enumerate(zip(means, precisions_cholesky)):
        y = x @ chol - mu @ chol
        out[:, k] = const + torch.log(torch.diagonal(chol)).sum() - 0.5 * (y * y).sum(1)
    return out


class _LayerModel:
    """One layer's feature transform and mixture, as float64 tensors (CPU)."""

    def __init__(self, mean: Tensor, scale: Tensor, projection: Tensor | None, log_weights: Tensor,
                 means: Tensor, precisions_cholesky: Tensor, covariance_type: str, estimator: Any) -> None:
        self.mean, self.scale, self.projection = mean, scale, projection
        self.log_weights, self.means, self.precisions_cholesky = log_weights, means, precisions_cholesky
        self.covariance_type = covariance_type
        self.estimator = estimator  # the fitted sklearn mixture, kept for inspection

    @property
    def n_components(self) -> int:
        return len(self.log_weights)

    def transform(self, h: Tensor) -> Tensor:
        """Standardise (and project) raw pooled features, in float64 on ``h``'s device."""
        dev = h.device
        z = (h.to(dev, torch.float64) - self.mean.to(dev)) / self.scale.to(dev)
        return z if self.projection is None else z @ self.projection.to(dev)

    def log_emissions(self, h: Tensor) -> Tensor:
        """log p(h | z = k) [N, K] for raw pooled features."""
        z = self.transform(h)
        return gaussian_log_densities(z, self.means.to(z.device), self.precisions_cholesky.to(z.device),
                                      self.covariance_type)


def _device_of(t: Tensor) -> torch.device:
    """float64 work stays with the features, except on MPS (no float64)."""
    return torch.device("cpu") if t.device.type == "mps" else t.device


#: id(layer features) -> (weak reference to them, {settings: fitted mixture}), for as long as the
#: features live (one evaluation); by identity, as tensors compare elementwise
_FITTED: dict[int, tuple[weakref.ref, dict]] = {}


class LSGM(Scorer):
    """Latent Sequential Gaussian Mixture: joint log-likelihood of an input's layer trace.

    Args:
        layers: layer names from ``Outputs.layers`` in network order (``"penultimate"``
            may also mean ``Outputs.features``), or ``"all"`` for every layer at fit time.
        n_components: components per layer (the truncation level for ``"dirichlet"``),
            ``"paper"`` = the paper's value by number of classes in ``train.labels``
            (10 -> 50, 100 -> 100, 200 -> 200, else 50), or ``"auto"`` = 5 × number of
            classes. Capped at the number of training samples.
        mixture: ``"dirichlet"`` (DP mixture, ``BayesianGaussianMixture``) or ``"gmm"``.
        max_iter, covariance_type, reg_covar: passed to the sklearn mixture. ``reg_covar``
            is relative to the standardised (unit-variance) features; the default is larger
            than sklearn's because pooled ReLU features have near-dead, collinear channels.
        transition_smoothing: additive pseudo-counts for every transition (and counted
            initial) row before normalising (see ``smoothing_per``); 0 allows impossible
            transitions.
        smoothing_per: ``"row"`` (``transition_smoothing`` pseudo-counts per row, spread over
            its cells) or ``"cell"`` (that many per cell: classic Laplace).
        mixture_weights: ``"first_layer"`` (§3.3 recursion) or ``"every_layer"`` (Eqs. 2/4).
        transitions: ``"hard"`` (argmax-posterior traces) or ``"soft"`` (expected counts).
        initial: ``"weights"`` (first layer's mixture weights) or ``"counted"``.
        standardize: standardise each layer with the ID training mean/std before fitting (not the
            paper's; with ``pca_dim`` an option for wide layers).
        pca_dim: project each layer wider than this onto its top principal components.
        min_weight: drop components whose weight is below this (renormalising the rest).
        joint: True scores the trace (LSGM); False sums per-layer GMM log-likelihoods.
        seed: random state of the mixtures and PCA.
        backend: ``"sklearn"`` or ``"torch"`` (our EM on the model's device; ``mixture="gmm"``,
            ``covariance_type="full"``, ``mixture_kwargs`` only ``tol``).
        mixture_kwargs: any further keyword arguments of the sklearn mixture (``tol``,
            ``n_init``, ``init_params``, ``weight_concentration_prior``, ...).

    Scores are float64 log-densities of the transformed features (higher = more ID).

    The fit (minutes per layer on CIFAR features) is cacheable: every tensor the scores read is
    in :meth:`fit_state`; a restored fit has no sklearn ``estimator`` on its layers (inspection only).
    """

    fit_cacheable = True

    def __init__(
        self,
        layers: str | Sequence[str] = "all",
        n_components: int | Literal["paper", "auto"] = 50,
        mixture: Literal["dirichlet", "gmm"] = "dirichlet",
        max_iter: int = 100,
        covariance_type: Literal["full", "diag"] = "full",
        reg_covar: float = 1e-4,
        transition_smoothing: float = 1.0,
        smoothing_per: Literal["row", "cell"] = "row",
        mixture_weights: Literal["first_layer", "every_layer"] = "first_layer",
        transitions: Literal["hard", "soft"] = "hard",
        initial: Literal["weights", "counted"] = "weights",
        standardize: bool = False,
        pca_dim: int | None = None,
        min_weight: float = 0.0,
        joint: bool = True,
        seed: int = 0,
        mixture_kwargs: Mapping[str, Any] | None = None,
        backend: Literal["sklearn", "torch"] = "sklearn",
    ) -> None:
        self.layers = layer_selection(layers, "detectors.<name>.layers")
        if n_components not in ("paper", "auto") and (isinstance(n_components, str) or int(n_components) < 1):
            raise ConfigError("detectors.<name>: LSGM n_components must be a positive int, 'paper' or 'auto', "
                              f"got {n_components!r}")
        checks = {"mixture": (mixture, ("dirichlet", "gmm")), "covariance_type": (covariance_type, ("full", "diag")),
                  "transitions": (transitions, ("hard", "soft")), "smoothing_per": (smoothing_per, ("row", "cell")),
                  "mixture_weights": (mixture_weights, ("first_layer", "every_layer")), "initial": (initial, ("weights", "counted")),
                  "backend": (backend, ("sklearn", "torch"))}
        for arg, (value, allowed) in checks.items():
            if value not in allowed:
                raise ConfigError(f"detectors.<name>: LSGM {arg} must be one of {allowed}, got {value!r}")
        if backend == "torch" and (mixture != "gmm" or covariance_type != "full" or set(mixture_kwargs or {}) - {"tol"}):
            raise ConfigError("detectors.<name>: LSGM backend=torch is EM for mixture=gmm with covariance_type=full "
                              f"(mixture_kwargs: tol only); got mixture={mixture!r}, covariance_type={covariance_type!r}, "
                              f"mixture_kwargs={dict(mixture_kwargs or {})}")
        if transition_smoothing < 0:
            raise ConfigError(f"detectors.<name>: LSGM transition_smoothing must be >= 0, got {transition_smoothing}")
        if pca_dim is not None and int(pca_dim) < 1:
            raise ConfigError(f"detectors.<name>: LSGM pca_dim must be a positive int or None, got {pca_dim}")
        if not 0.0 <= min_weight < 1.0:
            raise ConfigError(f"detectors.<name>: LSGM min_weight must be in [0, 1), got {min_weight}")
        self.n_components = n_components if n_components in ("paper", "auto") else int(n_components)
        self.smoothing_per = smoothing_per
        self.mixture_weights = mixture_weights
        self.mixture = mixture
        self.max_iter = int(max_iter)
        self.covariance_type = covariance_type
        self.reg_covar = float(reg_covar)
        self.transition_smoothing = float(transition_smoothing)
        self.transitions = transitions
        self.initial = initial
        self.standardize = bool(standardize)
        self.pca_dim = None if pca_dim is None else int(pca_dim)
        self.min_weight = float(min_weight)
        self.joint = bool(joint)
        self.seed = int(seed)
        self.mixture_kwargs = dict(mixture_kwargs or {})
        self.backend = backend
        #: where the torch backend fits (the model's device, set by :meth:`fit`)
        self.fit_device = torch.device("cpu")
        self.models: dict[str, _LayerModel] = {}
        self.log_init: Tensor | None = None
        self.log_transitions: list[Tensor] = []

    # ----------------------------------------------------------------------------- fit

    @property
    def layer_names(self) -> list[str]:
        """The fitted layers, in trace order."""
        return list(self.models)

    @property
    def transition_matrices(self) -> list[Tensor]:
        """A_i [k_i, k_{i+1}] as probabilities (rows sum to 1)."""
        return [t.exp() for t in self.log_transitions]

    def _resolve_k(self, train: Outputs) -> int:
        if self.n_components not in ("paper", "auto"):
            return int(self.n_components)
        if train.labels is None:
            raise ConfigError(f"detectors.<name>: LSGM n_components={self.n_components!r} needs class labels "
                              "in train.labels")
        classes = len(torch.unique(train.labels))
        if self.n_components == "auto":
            return 5 * classes
        return PAPER_COMPONENTS.get(classes, PAPER_COMPONENTS[10])

    def _make_mixture(self, k: int) -> Any:
        from sklearn.mixture import BayesianGaussianMixture, GaussianMixture

        if self.backend == "torch":
            from ood_lightning.detectors.torch_gmm import TorchGaussianMixture

            return TorchGaussianMixture(k, reg_covar=self.reg_covar, max_iter=self.max_iter, random_state=self.seed,
                                        device=self.fit_device, **self.mixture_kwargs)

        common = {"n_components": k, "covariance_type": self.covariance_type, "reg_covar": self.reg_covar,
                  "max_iter": self.max_iter, "random_state": self.seed}
        if self.mixture == "dirichlet":
            kwargs = {"weight_concentration_prior_type": "dirichlet_process", **common, **self.mixture_kwargs}
            return BayesianGaussianMixture(**kwargs)
        return GaussianMixture(**common, **self.mixture_kwargs)

    def _fit_layer(self, name: str, h: Tensor, k: int) -> _LayerModel:
        """The layer's mixture; fitted once per feature tensor and settings, so the per-layer-GMM
        ablation fitted beside LSGM on the same outputs reuses LSGM's mixtures instead of refitting."""
        settings = (k, self.mixture, self.covariance_type, self.reg_covar, self.max_iter, self.seed, self.standardize,
                    self.pca_dim, self.min_weight, tuple(sorted(self.mixture_kwargs.items())), self.backend)
        key = id(h)
        ref, fitted = _FITTED.get(key, (None, None))
        if ref is None or ref() is not h:  # a new tensor (ids are reused once a tensor is gone)
            fitted = {}
            _FITTED[key] = (weakref.ref(h, lambda _: _FITTED.pop(key, None)), fitted)
        if settings not in fitted:
            fitted[settings] = self._fit_new_layer(name, h, k)
        return fitted[settings]

    def _fit_new_layer(self, name: str, h: Tensor, k: int) -> _LayerModel:
        x = h.detach().to("cpu", torch.float64)
        if x.shape[0] < 2:
            raise ConfigError(f"detectors.<name>: LSGM needs at least 2 training samples, layer {name!r} has {x.shape[0]}")
        mean = x.mean(0) if self.standardize else torch.zeros(x.shape[1], dtype=x.dtype)
        scale = x.std(0, unbiased=False) if self.standardize else torch.ones(x.shape[1], dtype=x.dtype)
        scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))  # constant channels stay 0
        z = (x - mean) / scale
        projection = None
        if self.pca_dim is not None and self.pca_dim < z.shape[1]:
            from sklearn.decomposition import PCA

            pca = PCA(n_components=min(self.pca_dim, z.shape[0]), random_state=self.seed).fit(z.numpy())
            # no centring here: standardised z is centred, raw z's mean is a shift the mixture's means absorb
            projection = torch.from_numpy(pca.components_.T.copy())
            z = z @ projection
        if k > z.shape[0]:
            warnings.warn(f"LSGM layer {name!r}: {k} components for {z.shape[0]} samples; using {z.shape[0]}",
                          stacklevel=3)
            k = z.shape[0]
        est = self._make_mixture(k).fit(z.numpy())
        weights = torch.from_numpy(np.asarray(est.weights_, dtype=np.float64))
        keep = weights >= self.min_weight if self.min_weight > 0 else torch.ones_like(weights, dtype=torch.bool)
        if not keep.any():
            keep = weights == weights.max()
        weights = weights[keep] / weights[keep].sum()
        return _LayerModel(mean, scale, projection, weights.log(),
                           torch.from_numpy(np.asarray(est.means_, dtype=np.float64))[keep],
                           torch.from_numpy(np.asarray(est.precisions_cholesky_, dtype=np.float64))[keep],
                           self.covariance_type, est)

    def _counts(self, post_a: Tensor, post_b: Tensor) -> Tensor:
        """Transition counts [k_a, k_b] from two layers' log-posteriors [N, k]."""
        if self.transitions == "soft":
            return post_a.exp().T @ post_b.exp()
        counts = torch.zeros(post_a.shape[1], post_b.shape[1], dtype=post_a.dtype)
        counts.index_put_((post_a.argmax(1), post_b.argmax(1)), torch.ones(len(post_a), dtype=post_a.dtype),
                          accumulate=True)
        return counts

    def _log_normalise(self, counts: Tensor) -> Tensor:
        per_cell = self.transition_smoothing / (counts.shape[-1] if self.smoothing_per == "row" else 1)
        smoothed = counts + per_cell
        return smoothed.log() - smoothed.sum(-1, keepdim=True).log()

    def fit(self, model: FeatureModel, data: FitData) -> LSGM:
        if self.backend == "torch" and isinstance(model, torch.nn.Module):
            self.fit_device = next(model.parameters(), torch.empty(0)).device
        return self.fit_outputs(data.train)

    def fit_outputs(self, train: Outputs) -> LSGM:
        """The per-layer mixtures and the transition matrices, from ID training outputs."""
        names = (list(train.layers) or [PENULTIMATE]) if self.layers == "all" else list(self.layers)
        feats = {n: _layer_features(train, n) for n in names}
        k = self._resolve_k(train)
        log.info("LSGM fit: %d ID training inputs, layers %s, %d components per layer (n_components=%s)",
                 len(feats[names[0]]), names, k, self.n_components)
        self.models = {n: self._fit_layer(n, feats[n], k) for n in names}
        posts = []
        for name, m in self.models.items():
            weighted = m.log_emissions(feats[name].to("cpu")) + m.log_weights
            posts.append(weighted - torch.logsumexp(weighted, 1, keepdim=True))
        self.log_transitions = [self._log_normalise(self._counts(a, b)) for a, b in zip(posts, posts[1:])]
        if self.initial == "weights":
            self.log_init = self.models[names[0]].log_weights.clone()
        else:
            first = posts[0]
            counts = first.exp().sum(0) if self.transitions == "soft" else torch.bincount(
                first.argmax(1), minlength=first.shape[1]).to(first.dtype)
            self.log_init = self._log_normalise(counts)
        return self

    def fit_state(self) -> dict[str, StateValue]:
        self._check_fitted()
        state: dict[str, StateValue] = {"layers": list(self.models), "log_init": self.log_init,
                                        "n_transitions": len(self.log_transitions)}
        for i, m in enumerate(self.models.values()):
            state.update({f"layer{i}/mean": m.mean, f"layer{i}/scale": m.scale, f"layer{i}/log_weights": m.log_weights,
                          f"layer{i}/means": m.means, f"layer{i}/precisions_cholesky": m.precisions_cholesky})
            if m.projection is not None:
                state[f"layer{i}/projection"] = m.projection
        state.update({f"transition{i}": t for i, t in enumerate(self.log_transitions)})
        return state

    def load_fit_state(self, state: dict[str, StateValue]) -> None:
        names = [str(n) for n in state["layers"]]
        if int(state["n_transitions"]) != len(names) - 1:
            raise ValueError(f"{len(names)} layers with {state['n_transitions']} transitions")
        models = {n: _LayerModel(state[f"layer{i}/mean"], state[f"layer{i}/scale"], state.get(f"layer{i}/projection"),
                                 state[f"layer{i}/log_weights"], state[f"layer{i}/means"],
                                 state[f"layer{i}/precisions_cholesky"], self.covariance_type, None)
                  for i, n in enumerate(names)}
        self.models, self.log_init = models, state["log_init"]
        self.log_transitions = [state[f"transition{i}"] for i in range(len(names) - 1)]

    # --------------------------------------------------------------------------- score

    def _check_fitted(self) -> None:
        if self.log_init is None:
            raise RuntimeError("LSGM.score called before fit: call fit(model, train_outputs) first")

    def log_emissions(self, outputs: Outputs) -> dict[str, Tensor]:
        """log p(h_l | z_l = k) [N, k_l] for every fitted layer."""
        self._check_fitted()
        out = {}
        for name, m in self.models.items():
            h = _layer_features(outputs, name).detach()
            out[name] = m.log_emissions(h.to(_device_of(h)))
        return out

    def layer_log_likelihoods(self, outputs: Outputs) -> dict[str, Tensor]:
        """Per-layer GMM log-likelihoods log Σ_k w_k p(h_l|k) [N] (the "per-layer GMM" baseline)."""
        with torch.no_grad():
            return {n: torch.logsumexp(e + self.models[n].log_weights.to(e.device), 1)
                    for n, e in self.log_emissions(outputs).items()}

    def setting(self) -> dict[str, object]:
        return {"mixture": self.mixture, "backend": self.backend, "standardize": self.standardize,
                "pca_dim": self.pca_dim, "components": {n: m.n_components for n, m in self.models.items()},
                "joint": self.joint}

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        if not self.joint:
            return sum(self.layer_log_likelihoods(outputs).values())  # type: ignore[return-value]
        with torch.no_grad():
            emissions = list(self.log_emissions(outputs).values())
            if self.mixture_weights == "every_layer":  # Eqs. 2/4: P(z_i | Φ_i) at layers 2..m too
                weights = [m.log_weights for m in self.models.values()]
                emissions = [emissions[0]] + [e + w.to(e) for e, w in zip(emissions[1:], weights[1:])]
            return forward_algorithm(self.log_init, self.log_transitions, emissions)  # type: ignore[arg-type]


def scoring_time(
    train: Outputs,
    test: Outputs,
    n_components: Sequence[int] = (10, 20, 50, 100),
    n_layers: Sequence[int] | None = None,
    repeats: int = 3,
    **lsgm_kwargs: Any,
) -> list[dict[str, float | int]]:
    """Scoring time per input against components and layers (data for the paper's Fig. 7).

    For each k and m, fits ``LSGM(layers=<first m layers>, n_components=k, **lsgm_kwargs)``
    on ``train`` and times ``score`` on ``test`` (best of ``repeats``; fitting is not timed).
    ``n_layers`` defaults to 1..number of layers. Returns one dict per (k, m) with
    ``n_components``, ``n_layers``, ``n_inputs``, ``seconds`` and ``seconds_per_input``.
    """
    names = list(train.layers) or [PENULTIMATE]
    rows: list[dict[str, float | int]] = []
    for k in n_components:
        for m in n_layers or range(1, len(names) + 1):
            if not 1 <= m <= len(names):
                raise ValueError(f"scoring_time: n_layers={m} but outputs have {len(names)} layers")
            det = LSGM(layers=names[:m], n_components=k, **lsgm_kwargs).fit_outputs(train)
            best = math.inf
            for _ in range(max(1, repeats)):
                start = time.perf_counter()
                det.score(None, test)  # type: ignore[arg-type]
                best = min(best, time.perf_counter() - start)
            rows.append({"n_components": int(k), "n_layers": int(m), "n_inputs": len(test),
                         "seconds": best, "seconds_per_input": best / max(1, len(test))})
    return rows
