"""SHE (Zhang et al., "Out-of-Distribution Detection based on In-Distribution Data Patterns
Memorization with Modern Hopfield Energy", ICLR 2023): similarity to the stored pattern of
the predicted class."""

from __future__ import annotations

import torch
from torch import Tensor

from ood_lightning.detectors.card import Card
from ood_lightning.detectors.fit_checks import as_float, per_class_counts, train_outputs
from ood_lightning.scoring.api import FeatureModel, FitData, Outputs, Scorer


class SHE(Scorer):
    """Score = fᵀ S_ŷ, ŷ = argmax logits, S_c = mean penultimate feature of the ID training
    samples of class c that the model classifies *correctly* (the simplified Hopfield
    energy with the inner-product metric, as in the paper and OpenOOD's she.yml).
    A class with no correctly classified fit sample is refused. No hyperparameters.
    """

    card = Card(
        label="SHE",
        paper="Zhang et al., ICLR 2023",
        needs="features + logits; fit with labels",
        defaults=("inner product with the mean feature of the correctly classified training samples of the "
                  "predicted class (paper, OpenOOD `she.yml`)"),
    )

    def __init__(self) -> None:
        self.patterns: Tensor | None = None  # [C, D]

    def fit(self, model: FeatureModel, data: FitData) -> SHE:
        train = train_outputs(data, "she", labels=True)
        f = as_float(train.features).double()
        labels = train.labels.to(f.device).long()
        correct = train.logits.argmax(-1).to(f.device) == labels
        c = train.logits.shape[1]
        counts = per_class_counts(labels[correct], c, "she", what="correctly classified fit sample").to(f.device)  # correct ones per class
        sums = torch.zeros(c, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, labels[correct], f[correct])
        self.patterns = sums / counts[:, None].to(f.dtype)
        return self

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        if self.patterns is None:
            raise RuntimeError("SHE.score called before fit")
        f = as_float(outputs.features).double()
        pred = outputs.logits.argmax(-1).to(f.device)
        return (f * self.patterns.to(f.device)[pred]).sum(-1)
