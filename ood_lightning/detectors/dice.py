"""DICE (Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection",
ECCV 2022): energy of a head whose weights with small expected contribution are dropped."""

from __future__ import annotations

import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors.card import Card
from ood_lightning.detectors.energy import energy_score
from ood_lightning.detectors.fit_checks import as_float, train_outputs
from ood_lightning.detectors.head import linear_head
from ood_lightning.scoring.api import FeatureModel, FitData, Outputs, Scorer


class DICE(Scorer):
    """Score = logsumexp((M ⊙ W) f + b), M_cd = [V_cd > q_p(V)], V = W ⊙ mean_train(f).

    V_cd is unit d's expected contribution to class c's logit on the ID training set;
    the fraction ``sparsity`` = p of the C·D weights with the smallest contribution is
    masked (q_p = the p-quantile of V, linear interpolation as numpy.percentile in the
    reference code). Default p = 0.9: the paper's CIFAR setting (OpenOOD's dice.yml
    p: 90); the paper uses 0.7 on ImageNet. Needs a linear head (model.head).
    """

    card = Card(
        label="DICE",
        paper="Sun & Li, ECCV 2022",
        needs="penultimate features, *head*; fit",
        defaults="sparsity p = 0.9: the paper's CIFAR setting (OpenOOD `dice.yml`); 0.7 on ImageNet",
    )

    needs_linear_head = True

    def __init__(self, sparsity: float = 0.9) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"detectors.dice.sparsity must be in [0, 1), got {sparsity}")
        self.sparsity = float(sparsity)
        self.masked_weight: Tensor | None = None
        self.bias: Tensor | None = None

    def fit(self, model: FeatureModel, data: FitData) -> DICE:
        train = train_outputs(data, "dice")
        w, b = linear_head(model, "dice", train.features)
        mean = as_float(train.features).double().mean(0)
        w64 = w.double().to(mean.device)
        contrib = w64 * mean[None, :]
        threshold = torch.quantile(contrib.flatten().cpu(), self.sparsity).to(contrib.device)
        self.masked_weight = torch.where(contrib > threshold, w64, torch.zeros_like(w64))
        self.bias = b.double().to(mean.device)
        return self

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        if self.masked_weight is None:
            raise RuntimeError("DICE.score called before fit")
        f = as_float(outputs.features).double()
        logits = f @ self.masked_weight.to(f.device).T + self.bias.to(f.device)
        return energy_score(logits)
