"""Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017): the baseline every paper reports."""

from __future__ import annotations

import torch
from torch import Tensor

from ood_lightning.detectors.card import Card
from ood_lightning.scoring.api import FeatureModel, Outputs, Scorer


class MSP(Scorer):
    """Score = max_c softmax(logits)_c; confident predictions are taken as in-distribution."""

    card = Card(
        label="MSP",
        paper="Hendrycks & Gimpel, ICLR 2017",
        needs="logits",
        defaults="none",
    )

    needs_fit = False

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        logits = outputs.logits.detach()
        # Half-precision logits are upcast (softmax saturates in fp16); float64 is kept.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return logits.softmax(-1).amax(-1)
