"""Energy score (Liu et al., NeurIPS 2020): negative free energy of the logits.

Unlike MSP it is not normalised away by the softmax, so it keeps the magnitude of the
logits, which separates ID from OOD better than the max probability alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors.card import Card
from ood_lightning.scoring.api import FeatureModel, Outputs, Scorer


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T * logsumexp(logits / T)`` per row (→ max logit as T → 0), at least in float32."""
    logits = logits.detach()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return temperature * torch.logsumexp(logits / temperature, dim=-1)


class Energy(Scorer):
    """Score = T·logsumexp(logits/T), i.e. minus the free energy (higher = more ID)."""

    card = Card(
        label="Energy",
        paper="Liu et al., NeurIPS 2020",
        needs="logits",
        defaults="T = 1 (paper)",
    )

    needs_fit = False

    def __init__(self, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ConfigError(f"detectors.energy.temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        return energy_score(outputs.logits, self.temperature)
