"""NNGuide (Park et al., "Nearest Neighbor Guidance for Out-of-Distribution Detection",
ICCV 2023): the energy, guided by the similarity to energy-weighted ID training features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors.card import Card
from ood_lightning.detectors.energy import energy_score
from ood_lightning.detectors.fit_checks import as_float, require_samples, train_outputs
from ood_lightning.detectors.knn import unit_queries
from ood_lightning.scoring.api import FeatureModel, FitData, Outputs, Scorer


class NNGuide(Scorer):
    """Score = E(x) · mean of the k largest ⟨ẑ(x), E(z_i) ẑ(z_i)⟩ over the bank, E = logsumexp(logits).

    The bank holds the L2-normalised ID training features ẑ, each scaled by its energy.
    Default k = 10: the authors' configs/detector/nnguide.yaml (OpenOOD uses 100). The
    authors build the bank from a random 1% of ImageNet's 1.28M training images;
    ``bank_fraction`` (default 1.0) samples a seeded fraction of the fit set, which is
    already capped by evaluation.fit_limit. A bank smaller than k is refused.
    """

    card = Card(
        label="NNGuide",
        paper="Park et al., ICCV 2023",
        needs="features + logits; fit",
        defaults=("k = 10 (authors' `configs/detector/nnguide.yaml`; OpenOOD uses 100); the bank is the whole fit "
                  "set (`bank_fraction: 1.0`) where the authors sample 1% of ImageNet's 1.28M images"),
    )

    def __init__(self, k: int = 10, bank_fraction: float = 1.0, seed: int = 0, chunk: int = 16384) -> None:
        if int(k) != k or k < 1:
            raise ConfigError(f"detectors.nnguide.k must be an integer >= 1, got {k}")
        if not 0.0 < bank_fraction <= 1.0:
            raise ConfigError(f"detectors.nnguide.bank_fraction must be in (0, 1], got {bank_fraction}")
        self.k, self.bank_fraction, self.seed, self.chunk = int(k), float(bank_fraction), int(seed), int(chunk)
        self.bank: Tensor | None = None

    def fit(self, model: FeatureModel, data: FitData) -> NNGuide:
        train = train_outputs(data, "nnguide")
        n = len(train)
        m = max(1, round(n * self.bank_fraction))
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:m] if m < n else torch.arange(n)
        require_samples(m, self.k, "nnguide", "k", f"the top-{self.k} similarities (bank of {m})")
        idx = idx.to(train.features.device)
        f, logits = as_float(train.features[idx]), as_float(train.logits[idx])
        self.bank = F.normalize(f, dim=-1) * energy_score(logits)[:, None].to(f.dtype)
        return self

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        z, bank = unit_queries(outputs, self.bank, "NNGuide")
        top = z.new_empty(len(z), 0)
        for b in bank.split(self.chunk):
            both = torch.cat([top, z @ b.T], dim=1)
            top = both.topk(min(self.k, both.shape[1]), dim=1).values
        return top.mean(-1) * energy_score(outputs.logits).to(z.dtype)
