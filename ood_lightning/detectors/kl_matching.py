"""KL-Matching (Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World
Settings", ICML 2022): how far an input's posterior is from the typical posterior of
the class it is predicted as."""

from __future__ import annotations

import torch
from torch import Tensor

from ood_lightning.detectors.card import Card
from ood_lightning.detectors.fit_checks import as_float, train_outputs
from ood_lightning.scoring.api import FeatureModel, FitData, Outputs, Scorer


class KLMatching(Scorer):
    """Score = −min_k KL(p(·|x) ‖ d_k), d_k = mean posterior of the fit samples *predicted* as k.

    No labels are needed (the paper's point: the predicted class defines the template).
    The paper estimates d_k on held-out ID validation data: ``FitData.val`` is used when
    the evaluation provides it, else ``FitData.train`` (as the ViM authors' benchmark
    code does); ``fitted_on`` records which. Classes never predicted get no template.
    No hyperparameters.
    """

    card = Card(
        label="KL-Matching",
        paper="Hendrycks et al., ICML 2022",
        needs="logits; fit (no labels)",
        defaults=("templates = mean posterior per *predicted* class, on `FitData.val` if given, else the training "
                  "fit set"),
    )

    def __init__(self) -> None:
        self.templates: Tensor | None = None  # [K, C] float64
        self.fitted_on: str | None = None

    def fit(self, model: FeatureModel, data: FitData) -> KLMatching:
        out, self.fitted_on = (data.val, "val") if data.val is not None else (train_outputs(data, "kl_matching"), "train")
        p = as_float(out.logits).double().softmax(-1)
        pred = p.argmax(-1)
        self.templates = torch.stack([p[pred == k].mean(0) for k in pred.unique()])
        return self

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        if self.templates is None:
            raise RuntimeError("KLMatching.score called before fit")
        logp = as_float(outputs.logits).double().log_softmax(-1)
        d = self.templates.to(logp.device)
        # KL(p‖d_k) = Σ p log p − Σ p log d_k, for every template at once
        kl = (logp.exp() * logp).sum(-1, keepdim=True) - logp.exp() @ d.clamp_min(1e-300).log().T
        return -kl.amin(-1)
