"""ODIN (Liang et al., ICLR 2018): temperature scaling plus a small input perturbation.

The perturbation pushes each input towards higher confidence in its own predicted class;
ID inputs respond more strongly than OOD ones, which widens the gap in max softmax.
Liang et al. tune T and ε on OOD data; ``epsilons`` instead chooses ε on ID validation inputs
only (Generalized ODIN's criterion: the highest mean score), the LSGM paper's "ODIN*".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors.card import Card
from ood_lightning.scoring.api import FeatureModel, FitData, Outputs, Scorer
from ood_lightning.scoring.input_step import (
    best_epsilon,
    check_epsilons,
    check_std,
    epsilon_choice,
    mean_scores_over_epsilons,
    perturbation_setting,
    sign_step,
)


class ODIN(Scorer):
    """Score = max softmax(model(x̃)/T) with x̃ = x − ε·sign(−∇ₓ log softmax_ŷ(x)/T).

    ``epsilon`` is in *pixel units* when ``input_std`` is given (the configs pass
    ``${data.std}``): inputs reach the model standardised by the per-channel std, so the
    step on them is ε·sign(∇)/std_c, as in the reference code, and ε = 0.0014 is the
    paper's 0.0014. With ``input_std=None`` (data without a std) the step is ε·sign(∇)
    on the model's inputs as they are.
    With ``epsilon == 0`` no gradient is computed and the score is temperature-scaled MSP,
    which can then be read from cached outputs (``per_batch`` is False).

    ``epsilons`` (a grid, same units as ``epsilon``) turns on the choice of ε without OOD
    data: :meth:`fit` sets ``epsilon`` to the grid value with the highest mean score on the
    ID validation inputs (``FitData.val_inputs``) and records every mean in ``search``.
    """

    card = Card(
        label="ODIN",
        paper="Liang et al., ICLR 2018",
        needs="inputs + input gradient",
        defaults=("T = 1000, ε = 0.0014 in pixel units (`input_std: ${data.std}` divides the sign step by the "
                  "per-channel std, as the reference code): the paper's CIFAR setting; with "
                  "`evaluation.epsilon_grid` (set by `method=lsgm`) ε is the grid value of the highest mean "
                  "ID-validation score (Generalized ODIN's criterion, no OOD data)"),
    )

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014,
                 input_std: Sequence[float] | None = None, epsilons: Sequence[float] | None = None,
                 batch_size: int = 256) -> None:
        for key, value, ok, rule in (("temperature", temperature, temperature > 0, "> 0"),
                                     ("epsilon", epsilon, epsilon >= 0, ">= 0")):
            if not ok:
                raise ConfigError(f"detectors.odin.{key} must be {rule}, got {value}")
        self.temperature, self.epsilon = float(temperature), float(epsilon)
        self.input_std = check_std(input_std, "odin")
        self.epsilons = check_epsilons(epsilons, "odin")
        self.batch_size = int(batch_size)
        #: mean ID-validation score per ε of the last :meth:`select_epsilon`
        self.search: dict[float, float] = {}

    @property
    def needs_fit(self) -> bool:  # type: ignore[override]
        """Only the ε search fits anything (on ID validation inputs, handed over with the fit data)."""
        return self.epsilons is not None

    @property
    def per_batch(self) -> bool:  # type: ignore[override]
        """Only the perturbation needs the inputs; ε = 0 is plain temperature scaling."""
        return self.epsilon > 0

    def _scaled_msp(self, logits: Tensor) -> Tensor:
        logits = logits.detach()
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return (logits / self.temperature).softmax(-1).amax(-1)

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        if self.epsilon > 0:
            raise RuntimeError(
                f"ODIN(epsilon={self.epsilon}) perturbs inputs: call score_batch(model, x), "
                "or set epsilon=0 to score cached outputs"
            )
        return self._scaled_msp(outputs.logits)

    def ascent_direction(self, model: FeatureModel, x: Tensor) -> Tensor:
        """−sign(∇ₓ NLL)/std: the step that raises log softmax_ŷ(x/T) of the predicted class ŷ
        (gradient w.r.t. x only: parameters' ``.grad`` are untouched)."""
        x_in = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x_in)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / self.temperature
            # Summed NLL: each sample's input gradient is that of its own -log softmax_ŷ.
            loss = F.cross_entropy(logits, logits.argmax(-1).detach(), reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_in)
        return -sign_step(grad, self.input_std, "odin").to(x.dtype)

    def perturb(self, model: FeatureModel, x: Tensor, epsilon: float | None = None) -> Tensor:
        """The perturbed input x̃ = x − ε·sign(∇ₓ NLL)/std, with ε = ``self.epsilon`` by default."""
        eps = self.epsilon if epsilon is None else float(epsilon)
        return x.detach() + eps * self.ascent_direction(model, x) if eps > 0 else x.detach()

    def fit(self, model: FeatureModel, data: FitData) -> ODIN:
        """With ``epsilons``: choose ε on ID validation inputs (no OOD data)."""
        if self.epsilons is not None:
            self.select_epsilon(model, data.val_inputs)
        return self

    def selected(self) -> dict[str, object]:
        return epsilon_choice(self.search, self.epsilon)

    def setting(self) -> dict[str, object]:
        return perturbation_setting(self.epsilon, self.epsilons)

    def select_epsilon(self, model: FeatureModel, id_val_inputs: Tensor) -> float:
        """Set and return the grid's ε of the highest mean score on ID validation inputs."""
        grid = self.epsilons if self.epsilons is not None else (self.epsilon,)
        def score_at(b: Tensor, d: Tensor, eps: float) -> Tensor:
            return self._scaled_msp(model(b + eps * d if eps > 0 else b))

        self.search = mean_scores_over_epsilons(id_val_inputs, grid, self.batch_size,
                                                lambda b: self.ascent_direction(model, b), score_at)
        self.epsilon = best_epsilon(self.search)
        return self.epsilon

    def score_batch(self, model: FeatureModel, x: Tensor) -> Tensor:
        if self.epsilon == 0:
            with torch.no_grad():
                return self._scaled_msp(model(x))
        x_tilde = self.perturb(model, x)
        with torch.no_grad():
            return self._scaled_msp(model(x_tilde))
