"""Mahalanobis detector (Lee et al., NeurIPS 2018): class-conditional Gaussians, tied covariance.

Each chosen layer's (pooled) features are modelled as N(μ_c, Σ) per class with one shared
Σ; a sample's layer score is minus its squared Mahalanobis distance to the closest class
mean, and layer scores are summed with weights. Equal weights need no OOD data
("Mahalanobis*"); :func:`fit_logistic_weights` reproduces the paper's weights tuned on OOD
data, which makes results optimistic and must be reported as such.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors.card import Card
from ood_lightning.scoring.api import FeatureModel, FitData, Outputs, Scorer, StateValue, layer_selection, pool
from ood_lightning.scoring.input_step import (
    best_epsilon,
    check_epsilons,
    check_std,
    epsilon_choice,
    mean_scores_over_epsilons,
    perturbation_setting,
    sign_step,
)

PENULTIMATE = "penultimate"


def _layer(outputs: Outputs | Mapping[str, Tensor], name: str) -> Tensor:
    """Pooled features of one layer; "penultimate" falls back to ``outputs.features``."""
    layers = outputs.layers if isinstance(outputs, Outputs) else outputs
    if name in layers:
        return pool(layers[name])
    if name == PENULTIMATE and isinstance(outputs, Outputs):
        return outputs.features
    raise KeyError(f"Mahalanobis layer {name!r} not in outputs (available: {sorted(layers)})")


def _stats_device(t: Tensor) -> torch.device:
    """Float64 statistics live with the features, except on MPS, which has no float64."""
    return torch.device("cpu") if t.device.type == "mps" else t.device


class Mahalanobis(Scorer):
    """Score = Σ_l w_l · max_c −(f_l − μ_{l,c})ᵀ Σ_l⁻¹ (f_l − μ_{l,c}).

    Args:
        layers: layer names from ``Outputs.layers`` (``"penultimate"`` may also mean
            ``Outputs.features``), or ``"all"`` for every layer present at fit time.
        epsilon: input-perturbation step; > 0 turns on the paper's input pre-processing
            (and makes ``per_batch`` True). In pixel units when ``input_std`` is given (the
            sign step is divided by the per-channel std, as the reference code).
        input_std: the ID data's per-channel std (``${data.std}``), or None.
        layer_weights: per-layer weights (sequence aligned with the layers, or a
            name -> weight mapping); ``None`` means 1 for every layer (no OOD data used).
        shrinkage: s in Σ ← (1−s)Σ + s·(tr Σ / D)·I, for few samples or dead units.
        epsilons: a grid (units of ``epsilon``): :meth:`fit` then sets ``epsilon`` to the grid
            value of the highest mean score on the ID validation inputs (Generalized ODIN's
            criterion, no OOD data: the LSGM paper's "Mahalanobis*"); None keeps ``epsilon``.

    Σ is inverted with the pseudo-inverse, as the reference code: a unit that is constant
    (dead) on the fit data gets zero precision, so it adds nothing to any score.
    Statistics are kept in float64 (squared distances in high dimension are large and
    differ by little), and scores are returned in float64 for the same reason.

    Cacheable (:meth:`fit_state`): the fit itself is a covariance per layer, but an ε search makes
    one gradient and ``len(epsilons)`` forward passes over the ID validation inputs per layer.
    """

    card = Card(
        label="Mahalanobis",
        paper="Lee et al., NeurIPS 2018",
        needs="features (penultimate / all layers); fit with labels",
        defaults=("tied covariance / N, pseudo-inverse (a dead unit adds nothing), no input pre-processing, equal "
                  "layer weights (no OOD data); `mahalanobis_ensemble` takes its ε from `evaluation.epsilon_grid` "
                  "as ODIN does when that is set (`method=lsgm`: Mahalanobis*)"),
    )

    fit_cacheable = True

    def __init__(
        self,
        layers: str | Sequence[str] = (PENULTIMATE,),
        epsilon: float = 0.0,
        layer_weights: Sequence[float] | Mapping[str, float] | None = None,
        shrinkage: float = 0.0,
        input_std: Sequence[float] | None = None,
        epsilons: Sequence[float] | None = None,
        batch_size: int = 256,
    ) -> None:
        if epsilon < 0:
            raise ConfigError(f"detectors.<name>.epsilon: Mahalanobis epsilon must be >= 0, got {epsilon}")
        if not 0.0 <= shrinkage <= 1.0:
            raise ConfigError(f"detectors.<name>.shrinkage: Mahalanobis shrinkage must be in [0, 1], got {shrinkage}")
        self.layers = layer_selection(layers, "detectors.<name>.layers")
        self.epsilon = float(epsilon)
        self.layer_weights = layer_weights
        self.shrinkage = float(shrinkage)
        self.input_std = check_std(input_std, "mahalanobis")
        self.epsilons = check_epsilons(epsilons, "mahalanobis")
        self.batch_size = int(batch_size)
        #: mean ID-validation score per ε of the last :meth:`select_epsilon`
        self.search: dict[float, float] = {}
        self.classes: Tensor | None = None
        self.means: dict[str, Tensor] = {}
        self.covariances: dict[str, Tensor] = {}
        self.precisions: dict[str, Tensor] = {}
        self.weights: dict[str, float] = {}
        self._mu_p_mu: dict[str, Tensor] = {}

    @property
    def per_batch(self) -> bool:  # type: ignore[override]
        """Only the input pre-processing needs inputs; ε = 0 scores cached outputs."""
        return self.epsilon > 0

    @property
    def layer_names(self) -> list[str]:
        """The fitted layers, in the order their scores are summed."""
        return list(self.means)

    def _resolve_layers(self, train: Outputs) -> list[str]:
        if self.layers == "all":
            return list(train.layers) or [PENULTIMATE]
        return list(self.layers)

    def _resolve_weights(self, names: list[str]) -> dict[str, float]:
        w = self.layer_weights
        if w is None:
            return {n: 1.0 for n in names}
        if isinstance(w, Mapping):
            missing = [n for n in names if n not in w]
            if missing:
                raise ConfigError(f"detectors.<name>.layer_weights lacks layers {missing}")
            return {n: float(w[n]) for n in names}
        w = list(w)
        if len(w) != len(names):
            raise ConfigError(f"detectors.<name>.layer_weights: got {len(w)} weights for {len(names)} layers {names}")
        return {n: float(v) for n, v in zip(names, w)}

    def fit(self, model: FeatureModel, data: FitData) -> Mahalanobis:
        self.fit_outputs(data.train)
        if self.epsilons is not None:
            self.select_epsilon(model, data.val_inputs)
        return self

    def selected(self) -> dict[str, object]:
        return epsilon_choice(self.search, self.epsilon)

    def setting(self) -> dict[str, object]:
        return perturbation_setting(self.epsilon, self.epsilons)

    def select_epsilon(self, model: FeatureModel, id_val_inputs: Tensor) -> float:
        """Set and return the grid's ε of the highest mean score on ID validation inputs."""
        self.search = mean_scores_over_epsilons(
            id_val_inputs, self.epsilons if self.epsilons is not None else (self.epsilon,), self.batch_size,
            lambda b: self.ascent_directions(model, b), lambda b, d, eps: self._perturbed_score(model, b, d, eps))
        self.epsilon = best_epsilon(self.search)
        return self.epsilon

    def fit_outputs(self, train: Outputs) -> Mahalanobis:
        """Class means and the tied covariance of each layer, from ID training outputs."""
        if train.labels is None:
            raise ConfigError("Mahalanobis needs class labels in the ID training outputs (an unlabelled ID set cannot fit class means)")
        names = self._resolve_layers(train)
        self.weights = self._resolve_weights(names)
        self.means, self.covariances, self.precisions, self._mu_p_mu = {}, {}, {}, {}
        for name in names:
            x = _layer(train, name).detach()
            x = x.to(_stats_device(x), torch.float64)
            labels = train.labels.to(x.device)
            self.classes, inverse = torch.unique(labels, return_inverse=True)
            counts = torch.bincount(inverse, minlength=len(self.classes)).to(x.dtype)
            means = torch.zeros(len(self.classes), x.shape[1], dtype=x.dtype, device=x.device)
            means.index_add_(0, inverse, x)
            means /= counts[:, None]
            centred = x - means[inverse]
            cov = centred.T @ centred / x.shape[0]  # tied MLE covariance (divide by N)
            if self.shrinkage > 0:
                d = cov.shape[0]
                eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
                cov = (1 - self.shrinkage) * cov + self.shrinkage * torch.trace(cov) / d * eye
            precision = torch.linalg.pinv(cov, hermitian=True)
            self.means[name] = means
            self.covariances[name] = cov
            self.precisions[name] = precision
            self._mu_p_mu[name] = ((means @ precision) * means).sum(-1)
        return self

    def fit_state(self) -> dict[str, StateValue]:
        self._check_fitted()
        state: dict[str, StateValue] = {"layers": list(self.means), "weights": dict(self.weights),
                                        "epsilon": self.epsilon, "search": [[e, v] for e, v in self.search.items()],
                                        "classes": self.classes}
        for i, n in enumerate(self.means):
            state.update({f"layer{i}/means": self.means[n], f"layer{i}/covariance": self.covariances[n],
                          f"layer{i}/precision": self.precisions[n], f"layer{i}/mu_p_mu": self._mu_p_mu[n]})
        return state

    def load_fit_state(self, state: dict[str, StateValue]) -> None:
        names = [str(n) for n in state["layers"]]
        weights = {str(k): float(v) for k, v in state["weights"].items()}
        if set(weights) != set(names) or not names:
            raise ValueError(f"layer weights for {sorted(weights)}, layers {names}")
        parts = {part: {n: state[f"layer{i}/{part}"] for i, n in enumerate(names)}
                 for part in ("means", "covariance", "precision", "mu_p_mu")}
        self.means, self.covariances, self.precisions, self._mu_p_mu = (
            parts["means"], parts["covariance"], parts["precision"], parts["mu_p_mu"])
        self.weights, self.classes, self.epsilon = weights, state["classes"], float(state["epsilon"])
        self.search = {float(e): float(v) for e, v in state["search"]}

    def _check_fitted(self) -> None:
        if not self.means:
            raise RuntimeError("Mahalanobis.score called before fit: call fit(model, train_outputs) first")

    def _layer_score(self, name: str, f: Tensor) -> Tensor:
        """max_c −(f−μ_c)ᵀP(f−μ_c), expanded so no [N, C, D] tensor is built; differentiable."""
        dev = _stats_device(f)
        mu = self.means[name].to(dev)
        p = self.precisions[name].to(dev)
        f = f.to(dev, torch.float64)
        fp = f @ p
        dist = (fp * f).sum(-1, keepdim=True) - 2 * fp @ mu.T + self._mu_p_mu[name].to(dev)
        return -dist.amin(-1)

    def layer_scores(self, outputs: Outputs) -> dict[str, Tensor]:
        """Per-layer scores [N] (unweighted), e.g. for :func:`fit_logistic_weights`."""
        self._check_fitted()
        with torch.no_grad():
            return {n: self._layer_score(n, _layer(outputs, n)) for n in self.means}

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        scores = self.layer_scores(outputs)
        return sum(self.weights[n] * s for n, s in scores.items())  # type: ignore[return-value]

    def ascent_directions(self, model: FeatureModel, x: Tensor) -> list[Tensor]:
        """Per layer, sign(∇ₓ score_l(x))/std: the step towards the closest class mean in that layer."""
        self._check_fitted()
        names = self.layer_names
        x_in = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            feats = model.forward_features(x_in)
            clean = [self._layer_score(n, _layer(feats, n)).sum() for n in names]
            grads = [torch.autograd.grad(s, x_in, retain_graph=i < len(names) - 1)[0] for i, s in enumerate(clean)]
        return [sign_step(g, self.input_std, "mahalanobis").to(x.dtype) for g in grads]

    def _perturbed_score(self, model: FeatureModel, x: Tensor, directions: list[Tensor], epsilon: float) -> Tensor:
        """Σ_l w_l · score_l(x + ε·d_l): each layer re-scored on its own stepped input."""
        if epsilon == 0:
            return super().score_batch(model, x)
        total: Tensor | float = 0.0
        with torch.no_grad():
            for name, d in zip(self.layer_names, directions):
                f = _layer(model.forward_features(x.detach() + epsilon * d), name)
                total = total + self.weights[name] * self._layer_score(name, f)
        return total  # type: ignore[return-value]

    def score_batch(self, model: FeatureModel, x: Tensor) -> Tensor:
        """Scores after the paper's pre-processing, done per layer.

        For each layer, x̃_l = x + ε·sign(∇ₓ score_l(x)) moves the input towards its
        closest class mean in that layer; the layer is then re-scored on x̃_l.
        """
        if self.epsilon == 0:
            return super().score_batch(model, x)
        return self._perturbed_score(model, x, self.ascent_directions(model, x), self.epsilon)


def fit_logistic_weights(
    id_layer_scores: Mapping[str, Tensor | np.ndarray] | Tensor | np.ndarray,
    ood_layer_scores: Mapping[str, Tensor | np.ndarray] | Tensor | np.ndarray,
    **logreg_kwargs: object,
) -> dict[str, float] | list[float]:
    """Per-layer weights from a logistic regression of ID (1) vs OOD (0). USES OOD DATA.

    This is the original paper's tuned variant: it needs labelled OOD samples, so any
    result using these weights is not a fair OOD-agnostic number. Inputs are per-layer
    scores, either ``{layer: [N]}`` (as from :meth:`Mahalanobis.layer_scores`; returns a
    dict) or an array [N, L] (returns a list). Scores are standardised for the fit and
    the coefficients mapped back to raw-score units, so they can be passed directly as
    ``Mahalanobis(layer_weights=...)``.
    """
    from sklearn.linear_model import LogisticRegression

    def as_matrix(s: Mapping[str, Tensor | np.ndarray] | Tensor | np.ndarray) -> np.ndarray:
        if isinstance(s, Mapping):
            cols = [np.asarray(torch.as_tensor(v).detach().cpu(), dtype=np.float64) for v in s.values()]
            return np.stack(cols, axis=1)
        return np.asarray(torch.as_tensor(s).detach().cpu(), dtype=np.float64).reshape(len(s), -1)

    if isinstance(id_layer_scores, Mapping) != isinstance(ood_layer_scores, Mapping):
        raise TypeError("fit_logistic_weights: pass both score sets as mappings or both as arrays")
    if isinstance(id_layer_scores, Mapping) and isinstance(ood_layer_scores, Mapping):
        names = list(id_layer_scores)
        if set(names) != set(ood_layer_scores):
            raise ValueError("fit_logistic_weights: ID and OOD scores cover different layers")
        ood_layer_scores = {n: ood_layer_scores[n] for n in names}
    x_id, x_ood = as_matrix(id_layer_scores), as_matrix(ood_layer_scores)
    x = np.concatenate([x_id, x_ood])
    y = np.concatenate([np.ones(len(x_id)), np.zeros(len(x_ood))])
    mean, std = x.mean(0), x.std(0)
    std[std == 0] = 1.0
    kwargs = {"max_iter": 1000, **logreg_kwargs}
    clf = LogisticRegression(**kwargs).fit((x - mean) / std, y)  # type: ignore[arg-type]
    coef = (clf.coef_[0] / std).tolist()
    if isinstance(id_layer_scores, Mapping):
        return dict(zip(id_layer_scores, coef))
    return coef


class MahalanobisTuned(Mahalanobis):
    """Mahalanobis with logistic-regression layer weights fitted per OOD set. USES OOD DATA.

    The original paper's reported variant (Lee et al. 2018): for every OOD set the
    evaluation calls :meth:`fit` with ID validation outputs and a held-out tuning part of
    that OOD set (``FitData.val``, ``FitData.ood_tune``; first, like any scorer, with the ID training outputs); metrics are then computed on the rest only. Tables mark it "uses OOD data".
    """

    tunes_on_ood = True
    #: refitted per OOD set on that set's tuning part: never served from the fit cache
    fit_cacheable = False

    def __init__(self, layers: Sequence[str] | str = "all", **kwargs) -> None:
        super().__init__(layers=layers, **kwargs)
        if self.epsilons is not None:
            raise ConfigError("MahalanobisTuned: no ε search (epsilons) here; it tunes on OOD data already — "
                              "use Mahalanobis(epsilons=...) for the ID-validation choice")

    def fit(self, model: FeatureModel, data: FitData) -> MahalanobisTuned:
        if data.train is not None:
            self.fit_outputs(data.train)
        if data.ood_tune is not None:
            self.fit_ood(data.val, data.ood_tune)
        return self

    def fit_ood(self, id_outputs: Outputs, ood_outputs: Outputs) -> MahalanobisTuned:
        """Layer weights by logistic regression of ID validation against OOD tuning layer scores."""
        self._check_fitted()
        self.weights = fit_logistic_weights(self.layer_scores(id_outputs), self.layer_scores(ood_outputs))
        return self
