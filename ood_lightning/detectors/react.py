"""ReAct (Sun et al., NeurIPS 2021): clip penultimate activations, then score with energy.

OOD inputs tend to fire a few penultimate units abnormally high, which inflates their
logits; capping activations at an ID percentile removes that excess.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ood_lightning.detectors.energy import energy_score
from ood_lightning.errors import ConfigError
from ood_lightning.scoring.api import FeatureModel, FitData, Outputs, Scorer


class ReAct(Scorer):
    """Score = energy(model.classify(min(features, c))), c = ``percentile`` of ID activations.

    ``max_samples`` caps how many activations enter ``torch.quantile`` (which refuses
    inputs above 2**24 elements); larger training sets are subsampled with a fixed seed.
    """

    def __init__(self, percentile: float = 90.0, temperature: float = 1.0, max_samples: int = 1_000_000) -> None:
        if not 0.0 <= percentile <= 100.0:
            raise ConfigError(f"detectors.react.percentile must be in [0, 100], got {percentile}")
        if temperature <= 0:
            raise ConfigError(f"detectors.react.temperature must be > 0, got {temperature}")
        self.percentile = float(percentile)
        self.temperature = float(temperature)
        self.max_samples = int(max_samples)
        self.threshold: float | None = None

    def fit(self, model: FeatureModel, data: FitData) -> ReAct:
        flat = data.train.features.detach().reshape(-1)
        if flat.numel() > self.max_samples:
            # Seeded sampling (with replacement: no O(N) permutation of billions of indices).
            gen = torch.Generator().manual_seed(0)
            idx = torch.randint(flat.numel(), (self.max_samples,), generator=gen)
            flat = flat[idx.to(flat.device)]
        q = torch.quantile(flat.double().cpu(), self.percentile / 100.0)
        self.threshold = float(q)
        return self

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        if self.threshold is None:
            raise RuntimeError("ReAct.score called before fit: call fit(model, train_outputs) first")
        with torch.no_grad():
            logits = model.classify(outputs.features.clamp(max=self.threshold))
        return energy_score(logits, self.temperature)
