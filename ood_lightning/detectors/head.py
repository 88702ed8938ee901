"""The linear classifier head ``logits = W f + b`` that ViM, DICE, fDBD and GradNorm read.

These scores are defined on the weights of the last layer, so they are only valid when
``model.classify`` *is* that linear map on the penultimate features; a method whose
classify does more (VMDLS' latent mean, G-ODIN's decomposed head) declares
``OODMethod.has_linear_head = False`` and the evaluation skips these scorers; called directly on
such a model they refuse, rather than score wrongly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.scoring.api import FeatureModel


def linear_head(model: FeatureModel, detector: str, features: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(W [C, D], b [C]) of ``model.head``, checked against ``model.classify`` on ``features``."""
    head = model.head
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"detectors.{detector} reads the weights of a linear classifier head (model.head as "
                          f"nn.Linear), but this model's head is {type(head).__name__}: remove {detector} from "
                          "detectors for this method")
    w = head.weight.detach()
    b = head.bias.detach() if head.bias is not None else w.new_zeros(w.shape[0])
    if features is not None and len(features):
        f = features[:32].detach().to(w.device, w.dtype)
        with torch.no_grad():
            ref = model.classify(f).double()
        lin = (f @ w.T + b).double()
        if not torch.allclose(ref, lin, rtol=1e-3, atol=1e-3 * (1.0 + float(ref.abs().max()))):
            raise ConfigError(f"detectors.{detector} needs model.classify(f) == model.head(f) on the penultimate "
                              f"features, but this model's classify differs (max |diff| "
                              f"{float((ref - lin).abs().max()):.3g}): remove {detector} from detectors for this method")
    return w, b
