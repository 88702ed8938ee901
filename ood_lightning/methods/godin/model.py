"""``method=godin``: Generalized ODIN (Hsu et al., CVPR 2020), DeConf-C variant.

The classifier's logit is decomposed as f_i(x) = h_i(x) / g(x). h_i is the cosine similarity
between the penultimate features and class weight w_i (bounded, so it cannot be made large
just by scaling features); g(x) = sigmoid(BN(w_g·f(x) + b_g)) is a learned, input-dependent
inverse temperature that absorbs the over-confidence cross-entropy rewards. Trained with
plain cross-entropy on h/g, no OOD data; at test time max_i h_i(x) (or g(x)) scores
in-distribution-ness. The paper's input pre-processing lives in
:class:`ood_lightning.methods.godin.perturbation.GODINPerturbation`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.methods.classifier import Classifier
from ood_lightning.nn.modes import eval_mode
from ood_lightning.scoring.api import Outputs, Scorer


class CosineSimilarity(nn.Module):
    """h_i(x) = cos(f(x), w_i): one weight vector per class, no bias."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()


class DecomposedConfidence(nn.Module):
    """The DeConf head: ``parts(f) -> (h [B, C], g [B])``; ``forward(f) = h / g`` (the logits)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.h = CosineSimilarity(in_features, num_classes)
        # BN keeps g from saturating at 0 or 1 early in training, as the paper prescribes.
        self.g = nn.Sequential(nn.Linear(in_features, 1), nn.BatchNorm1d(1), nn.Sigmoid())

    def parts(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.h(features), self.g(features).squeeze(1)

    def forward(self, features: Tensor) -> Tensor:
        h, g = self.parts(features)
        return h / g.unsqueeze(1)


class GeneralizedODIN(Classifier):
    """Cross-entropy on h/g (the training and validation steps are the classifier's).

    ``classify`` returns h/g, so MSP/Energy/ODIN/... still apply. ``h_weight_decay`` is the
    weight decay of the class weights w_i (0 in the paper: decay would shrink them and, with
    the cosine, only distort the effective learning rate); every other parameter uses the
    optimiser's own ``weight_decay``.
    """

    has_linear_head = False

    def __init__(self, backbone: nn.Module, num_classes: int, optimizer: Any, scheduler: Any = None,
                 h_weight_decay: float = 0.0, label_smoothing: float = 0.0) -> None:
        super().__init__(backbone, num_classes, optimizer, scheduler, label_smoothing=label_smoothing)
        self.head = DecomposedConfidence(backbone.feature_dim, num_classes)
        self.h_weight_decay = float(h_weight_decay)

    def decomposed(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(h [B, C], g [B]) from penultimate features; what the perturbation detector differentiates."""
        return self.head.parts(features)

    @torch.no_grad()
    def decomposed_scores(self, features: Tensor) -> dict[str, Tensor]:
        """"h" = max_i h_i(x) (the paper's default) and "g" = g(x), higher = ID, from penultimate features.

        g's BatchNorm always uses its running statistics here, whatever the module's mode,
        so scoring cached features never changes the model.
        """
        ref = self.head.h.weight
        with eval_mode(self.head):
            h, g = self.decomposed(features.to(ref.device, ref.dtype))
        return {"h": h.amax(1), "g": g}

    def scorers(self) -> dict[str, Scorer]:
        return {"godin_h": DecomposedScore("h"), "godin_g": DecomposedScore("g")}

    def param_groups(self) -> list[dict[str, Any]]:
        """Two optimiser groups: the class weights w_i (``h_weight_decay``) and the rest."""
        exempt = self.head.h.weight
        rest = [p for p in self.parameters() if p is not exempt]
        return [{"params": rest}, {"params": [exempt], "weight_decay": self.h_weight_decay}]

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "epoch"}}


class DecomposedScore(Scorer):
    """G-ODIN's own score from cached features: max_i h_i(x) (``part="h"``) or g(x) (``"g"``)."""

    needs_fit = False

    def __init__(self, part: str) -> None:
        self.part = part

    def score(self, model: GeneralizedODIN, outputs: Outputs) -> Tensor:
        return model.decomposed_scores(outputs.features)[self.part]
