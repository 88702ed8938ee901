"""Generalized ODIN's input pre-processing (Hsu et al., CVPR 2020): step each input along the
sign of the gradient that *increases* its own score S(x) = max_i h_i(x) (or g(x)), then
score the stepped input. ID inputs gain more than OOD inputs, so the gap widens.

Unlike ODIN, ε is chosen without OOD data: the ε of a grid that maximises the mean score on
ID *validation* inputs: :meth:`GODINPerturbation.fit` runs that search
(:meth:`select_epsilon`) on ``FitData.val_inputs``; without a fit the configured
``epsilon`` is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.methods.godin.model import GeneralizedODIN as DecomposedModel
from ood_lightning.scoring.api import FitData, Outputs, Scorer
from ood_lightning.scoring.input_step import (
    best_epsilon,
    epsilon_choice,
    mean_scores_over_epsilons,
    perturbation_setting,
)


class GODINPerturbation(Scorer):
    """Score = S(x̃) with x̃ = x − ε·sign(−∇ₓ S(x)), S = max_i h_i ("h") or g ("g").

    ``epsilon`` is in *normalised-input units* (inputs reach the model standardised), as in
    :class:`~ood_lightning.detectors.odin.ODIN`. ``epsilons`` is the grid
    :meth:`select_epsilon` searches; ``epsilon`` is the one used until a search replaces
    it. The model must be in eval mode (the evaluation run sets it) so BatchNorm uses its
    running statistics.
    """

    def __init__(self, epsilons: Sequence[float] = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08), score: str = "h",
                 epsilon: float = 0.0025, batch_size: int = 256) -> None:
        if score not in ("h", "g"):
            raise ConfigError(f"detectors.<name>.score: GODINPerturbation score must be 'h' (max_i h_i) or 'g', got {score!r}")
        if not epsilons or any(e < 0 for e in epsilons) or epsilon < 0:
            raise ConfigError(f"detectors.<name>.epsilons / .epsilon: GODINPerturbation needs a non-empty grid of epsilons >= 0 and epsilon >= 0, "
                             f"got epsilons={tuple(epsilons)}, epsilon={epsilon}")
        self.epsilons = tuple(float(e) for e in epsilons)
        self.score_name = score
        self.epsilon = float(epsilon)
        self.batch_size = int(batch_size)
        #: mean ID-validation score per ε from the last :meth:`select_epsilon`
        self.search: dict[float, float] = {}

    @property
    def per_batch(self) -> bool:  # type: ignore[override]
        """Only the perturbation needs the inputs; at ε = 0 the cached features suffice."""
        return self.epsilon > 0

    def _score_features(self, model: DecomposedModel, features: Tensor) -> Tensor:
        if not isinstance(model, DecomposedModel):
            raise ConfigError(f"GODINPerturbation needs a model with a decomposed-confidence head (method=godin), "
                            f"got {type(model).__name__}")
        h, g = model.decomposed(features)
        s = h.amax(1) if self.score_name == "h" else g
        return s.to(torch.promote_types(s.dtype, torch.float32))

    def _score(self, model: DecomposedModel, x: Tensor) -> Tensor:
        return self._score_features(model, model.forward_features(x)["penultimate"])

    def ascent_direction(self, model: DecomposedModel, x: Tensor) -> Tensor:
        """sign(∇ₓ S(x)) per input (gradient w.r.t. x only: parameters' ``.grad`` are untouched)."""
        x_in = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            # Each input's score depends on that input only, so the sum's gradient is per-sample.
            (grad,) = torch.autograd.grad(self._score(model, x_in).sum(), x_in)
        return grad.sign().to(x.dtype)

    def perturb(self, model: DecomposedModel, x: Tensor, epsilon: float | None = None) -> Tensor:
        """x̃ = x − ε·sign(−∇ₓ S(x)) = x + ε·sign(∇ₓ S(x)), with ε = ``self.epsilon`` by default."""
        eps = self.epsilon if epsilon is None else float(epsilon)
        return x.detach() + eps * self.ascent_direction(model, x) if eps > 0 else x.detach()

    def score(self, model: DecomposedModel, outputs: Outputs) -> Tensor:
        if self.epsilon > 0:
            raise RuntimeError(f"GODINPerturbation(epsilon={self.epsilon}) perturbs inputs: call "
                               "score_batch(model, x), or set epsilon=0 to score cached outputs")
        features = outputs.features
        if isinstance(model, torch.nn.Module):  # cached features live on the CPU, the model may not
            ref = next(model.parameters())
            features = features.to(ref.device, ref.dtype)
        with torch.no_grad():
            return self._score_features(model, features)

    def fit(self, model: DecomposedModel, data: FitData) -> GODINPerturbation:
        """Choose ε on ID validation inputs (no OOD data)."""
        self.select_epsilon(model, data.val_inputs)
        return self

    def score_batch(self, model: DecomposedModel, x: Tensor) -> Tensor:
        x_tilde = self.perturb(model, x)
        with torch.no_grad():
            return self._score(model, x_tilde)

    def selected(self) -> dict[str, object]:
        return epsilon_choice(self.search, self.epsilon)

    def setting(self) -> dict[str, object]:
        return perturbation_setting(self.epsilon, self.epsilons)

    def select_epsilon(self, model: DecomposedModel, id_val_inputs: Tensor) -> float:
        """Set and return the ε of the grid with the highest mean score on ID validation inputs.

        ``id_val_inputs`` are preprocessed (normalised) inputs on the model's device. One
        gradient per input serves every ε: the step direction does not depend on ε.
        """
        self.search = mean_scores_over_epsilons(
            id_val_inputs, self.epsilons, self.batch_size, lambda b: self.ascent_direction(model, b),
            lambda b, d, eps: self._score(model, b + eps * d))
        self.epsilon = best_epsilon(self.search)
        return self.epsilon
