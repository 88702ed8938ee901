"""Per-sample reshaping of the penultimate activations before the head: ASH (Djurisic et
al., "Extremely Simple Activation Shaping for OOD Detection", ICLR 2023) and SCALE (Xu et
al., "Scaling for Training Time and Post-hoc OOD Detection Enhancement", ICLR 2024).

Both keep the k = D − round(D·p/100) largest activations of each sample (p = the
percentile, as the reference code's ``n - int(np.round(n * percentile / 100))``) and
score the energy of ``model.classify`` on the reshaped features. Both papers apply it to
the pooled penultimate features (after the last average pooling), as here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors.card import Card
from ood_lightning.detectors.energy import energy_score
from ood_lightning.detectors.fit_checks import as_float
from ood_lightning.scoring.api import FeatureModel, Outputs, Scorer


def kept_count(dim: int, percentile: float, detector: str) -> int:
    k = dim - round(dim * percentile / 100.0)
    if k < 1:
        raise ConfigError(f"detectors.{detector}.percentile={percentile} keeps no activation of {dim}: lower it")
    return k


def top_k_mask(f: Tensor, k: int) -> Tensor:
    """1 at each row's k largest entries, 0 elsewhere (ties broken by torch.topk)."""
    return torch.zeros_like(f).scatter_(1, f.topk(k, dim=1).indices, 1.0)


def _check_percentile(percentile: float, detector: str) -> float:
    if not 0.0 <= percentile < 100.0:
        raise ConfigError(f"detectors.{detector}.percentile must be in [0, 100), got {percentile}")
    return float(percentile)


class ASH(Scorer):
    """Score = energy(classify(ash(f))) with, on each sample's top-k activations (rest → 0):

    - ``variant="p"`` (ASH-P): keep their values;
    - ``variant="b"`` (ASH-B): set each to s₁/k, s₁ = Σ_d f_d (the sample's total, binarised);
    - ``variant="s"`` (ASH-S): multiply them by exp(s₁/s₂), s₂ = Σ of the kept values.

    Default ASH-S at percentile 90: the authors' configs for CIFAR-10 and ImageNet
    (``ash_s@90``) and OpenOOD's ash.yml. ASH assumes non-negative (post-ReLU) features.
    """

    card = Card(
        label="ASH-P/B/S",
        paper="Djurisic et al., ICLR 2023",
        needs="penultimate features, head via `classify`",
        defaults=("percentile 90 on the pooled penultimate features: the authors' configs (`ash_s@90` for CIFAR-10 "
                  "and ImageNet) and OpenOOD `ash.yml`"),
    )

    needs_fit = False
    VARIANTS = ("p", "b", "s")

    def __init__(self, variant: str = "s", percentile: float = 90.0) -> None:
        if variant not in self.VARIANTS:
            raise ConfigError(f"detectors.ash.variant must be one of {list(self.VARIANTS)}, got {variant!r}")
        self.variant = variant
        self.percentile = _check_percentile(percentile, "ash")

    def shape(self, f: Tensor) -> Tensor:
        f = as_float(f)
        k = kept_count(f.shape[1], self.percentile, "ash")
        mask = top_k_mask(f, k)
        kept = f * mask
        s1 = f.sum(1, keepdim=True)
        if self.variant == "p":
            return kept
        if self.variant == "b":
            return mask * (s1 / k)
        s2 = kept.sum(1, keepdim=True)
        ratio = torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, torch.ones_like(s2)), torch.zeros_like(s2))
        return kept * ratio.exp()

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        with torch.no_grad():
            return energy_score(model.classify(self.shape(outputs.features).to(outputs.features.dtype)))


class SCALE(Scorer):
    """Score = energy(classify(f · exp(s₁/s₂))), s₁ = Σ_d f_d, s₂ = Σ of the top-k f_d.

    Unlike ASH-S nothing is pruned: the top-k only sets the per-sample scale. Default
    percentile 85: the authors' configs/postprocessors/scale.yml (and OpenOOD's).
    """

    card = Card(
        label="SCALE",
        paper="Xu et al., ICLR 2024",
        needs="penultimate features, head via `classify`",
        defaults="percentile 85: the authors' `configs/postprocessors/scale.yml`",
    )

    needs_fit = False

    def __init__(self, percentile: float = 85.0) -> None:
        self.percentile = _check_percentile(percentile, "scale")

    def shape(self, f: Tensor) -> Tensor:
        f = as_float(f)
        k = kept_count(f.shape[1], self.percentile, "scale")
        s1 = f.sum(1, keepdim=True)
        s2 = f.topk(k, dim=1).values.sum(1, keepdim=True)
        ratio = torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, torch.ones_like(s2)), torch.zeros_like(s2))
        return f * ratio.exp()

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        with torch.no_grad():
            return energy_score(model.classify(self.shape(outputs.features).to(outputs.features.dtype)))
