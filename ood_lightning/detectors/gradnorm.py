"""GradNorm (Huang et al., "On the Importance of Gradients for Detecting Distributional
Shifts in the Wild", NeurIPS 2021): the L1 norm of the last layer's weight gradient of
KL(uniform ‖ softmax(logits/T))."""

from __future__ import annotations

from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors.card import Card
from ood_lightning.detectors.fit_checks import as_float
from ood_lightning.detectors.head import linear_head
from ood_lightning.scoring.api import FeatureModel, Outputs, Scorer


class GradNorm(Scorer):
    """Score = ‖∂ KL(u ‖ softmax(z/T)) / ∂W‖₁ for the head z = W f + b, in closed form.

    With L = −(1/C) Σ_c log softmax_c(z/T), ∂L/∂W_cd = (p_c − 1/C) f_d / T, so the norm
    factorises: (1/T) · ‖p − u‖₁ · ‖f‖₁. That is exactly the per-sample backward pass
    of the paper (gradient w.r.t. the last layer's *weight*, not its bias), read from
    the cached logits and features: no extra pass, no per-sample autograd. The
    reference code sums the log-softmax over classes instead of averaging (a constant
    factor C, same ranking). Default T = 1 (the paper). Needs a linear head (model.head).
    """

    card = Card(
        label="GradNorm",
        paper="Huang et al., NeurIPS 2021",
        needs="logits + penultimate features, *head*",
        defaults=("T = 1 (paper); the last-layer weight gradient's L1 norm in closed form, (1/T)·‖softmax − "
                  "u‖₁·‖f‖₁, equal to the paper's per-sample backward pass"),
    )

    needs_fit = False
    needs_linear_head = True

    def __init__(self, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ConfigError(f"detectors.gradnorm.temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self._checked: int | None = None

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        if self._checked != id(model):  # the closed form holds only for a linear head on the features
            linear_head(model, "gradnorm", outputs.features)
            self._checked = id(model)
        logits, f = as_float(outputs.logits), as_float(outputs.features)
        p = (logits / self.temperature).softmax(-1)
        return (p - 1.0 / p.shape[-1]).abs().sum(-1) * f.abs().sum(-1).to(p.dtype) / self.temperature
