"""Scores that are a fixed function of one input's logits: nothing to fit, no extra pass.

MaxLogit, predictive entropy and GEN differ only in which function of the (softmax of
the) logits they read, so they share this module; fitted logit scores (KL-Matching,
temperature scaling) live in their own.
"""

from __future__ import annotations

from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors.card import Card
from ood_lightning.detectors.fit_checks import as_float
from ood_lightning.scoring.api import FeatureModel, Outputs, Scorer


class MaxLogit(Scorer):
    """Score = max_c logit_c (Hendrycks et al., "Scaling Out-of-Distribution Detection for
    Real-World Settings", ICML 2022). Unlike MSP it is not normalised by the other logits,
    which the paper found to matter with many classes. No hyperparameters."""

    card = Card(
        label="MaxLogit",
        paper="Hendrycks et al., ICML 2022",
        needs="logits",
        defaults="none",
    )

    needs_fit = False

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        return as_float(outputs.logits).amax(-1)


class Entropy(Scorer):
    """Score = −H(p) = Σ_c p_c log p_c with p = softmax(logits): the predictive-entropy
    baseline (used e.g. by Chan et al., ICCV 2021, which pytorch-ood cites). Computed with
    log_softmax, so no probability is clipped. No hyperparameters."""

    card = Card(
        label="Entropy",
        paper="predictive entropy (e.g. Chan et al., ICCV 2021)",
        needs="logits",
        defaults="none",
    )

    needs_fit = False

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        logp = as_float(outputs.logits).log_softmax(-1)
        return (logp.exp() * logp).sum(-1)


class GEN(Scorer):
    """Generalized entropy (Liu et al., "GEN: Pushing the Limits of Softmax-Based OOD
    Detection", CVPR 2023): score = −Σ_{j ∈ top-M} p_j^γ (1 − p_j)^γ over the M largest
    softmax probabilities (a *sum*, as in the paper's Eq. and its code; pytorch-ood averages).

    Defaults γ = 0.1 and M = 100 (the paper's ImageNet setting and OpenOOD's gen.yml);
    M is capped at the number of classes, so on CIFAR-10 all 10 probabilities are used.
    """

    card = Card(
        label="GEN",
        paper="Liu et al., CVPR 2023",
        needs="logits",
        defaults=("γ = 0.1, M = 100 capped at C (paper's ImageNet setting, OpenOOD `gen.yml`); a sum over the top "
                  "M, as the paper"),
    )

    needs_fit = False

    def __init__(self, gamma: float = 0.1, top_m: int = 100) -> None:
        if not gamma > 0:
            raise ConfigError(f"detectors.gen.gamma must be > 0, got {gamma}")
        if int(top_m) != top_m or top_m < 1:
            raise ConfigError(f"detectors.gen.top_m must be an integer >= 1, got {top_m}")
        self.gamma = float(gamma)
        self.top_m = int(top_m)

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        p = as_float(outputs.logits).softmax(-1)
        m = min(self.top_m, p.shape[-1])
        p = p.topk(m, dim=-1).values
        return -(p.pow(self.gamma) * (1 - p).pow(self.gamma)).sum(-1)
