"""fDBD (Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024):
how far the feature is from the linear head's decision boundaries, relative to its
distance from the ID mean."""

from __future__ import annotations

from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors.card import Card
from ood_lightning.detectors.fit_checks import as_float, train_outputs
from ood_lightning.detectors.head import linear_head
from ood_lightning.scoring.api import FeatureModel, FitData, Outputs, Scorer


class FDBD(Scorer):
    """Score = 1/(C−1) Σ_{c≠ŷ} |l_ŷ − l_c| / ‖w_ŷ − w_c‖₂ / ‖f − μ‖₂.

    |l_ŷ − l_c| / ‖w_ŷ − w_c‖ is the exact distance of f to the boundary between the
    predicted class ŷ and c of the head l = W f + b; μ is the mean ID training feature
    (the paper's "distance to the training mean" normaliser; OpenOOD can swap in ‖f‖).
    Hyperparameter-free; needs a linear head (model.head) and at least two classes.
    """

    card = Card(
        label="fDBD",
        paper="Liu & Qin, ICML 2024",
        needs="features + logits, *head*; fit",
        defaults=("hyperparameter-free; normalised by the distance to the training mean (paper; OpenOOD's "
                  "`distance_as_normalizer: True`)"),
    )

    needs_linear_head = True

    def __init__(self) -> None:
        self.train_mean: Tensor | None = None
        self.weight: Tensor | None = None

    def fit(self, model: FeatureModel, data: FitData) -> FDBD:
        train = train_outputs(data, "fdbd")
        w, _ = linear_head(model, "fdbd", train.features)
        if w.shape[0] < 2:
            raise ConfigError(f"detectors.fdbd needs at least 2 classes, the head has {w.shape[0]}")
        self.weight = w.double()
        self.train_mean = as_float(train.features).double().mean(0)
        return self

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        if self.weight is None:
            raise RuntimeError("FDBD.score called before fit")
        logits = as_float(outputs.logits).double()
        f = as_float(outputs.features).double()
        w = self.weight.to(f.device)
        top, pred = logits.max(-1)
        gap = (top[:, None] - logits).abs()  # 0 at c = ŷ
        norms = (w[pred][:, None, :] - w[None, :, :]).norm(dim=-1)  # [N, C], 0 at c = ŷ
        dist = gap / norms.clamp_min(1e-12)
        spread = (f - self.train_mean.to(f.device)).norm(dim=-1).clamp_min(1e-12)
        return dist.sum(-1) / (logits.shape[1] - 1) / spread
