"""Relative Mahalanobis distance (Ren et al., "A Simple Fix to Mahalanobis Distance for
Improving Near-OOD Detection", arXiv 2106.09022, 2021): the class-conditional Mahalanobis
distance minus that under one background Gaussian of all ID features."""

from __future__ import annotations

import torch
from torch import Tensor

from ood_lightning.detectors.card import Card
from ood_lightning.detectors.fit_checks import as_float, per_class_counts, require_samples, train_outputs
from ood_lightning.scoring.api import FeatureModel, FitData, Outputs, Scorer


def _squared_mahalanobis(f: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """(f − μ_k)ᵀ P (f − μ_k) for every row of ``means``: [N, K], without an [N, K, D] tensor."""
    fp = f @ precision
    return (fp * f).sum(-1, keepdim=True) - 2 * fp @ means.T + ((means @ precision) * means).sum(-1)


class RMDS(Scorer):
    """Score = −min_k [MD_k(f) − MD_0(f)] on the penultimate features.

    MD_k: squared Mahalanobis distance to class mean μ_k under the tied within-class
    covariance Σ (as Mahalanobis); MD_0: to the mean of all fit features under their
    covariance Σ_0. Covariances divide by N (the MLE, as the reference's
    sklearn EmpiricalCovariance) and are inverted with the pseudo-inverse, so constant
    (dead) units add nothing. Fits in float64; every class needs a fit sample, and the
    fit set must exceed the number of classes. No hyperparameters.
    """

    card = Card(
        label="RMDS",
        paper="Ren et al., arXiv 2021",
        needs="penultimate features; fit with labels",
        defaults="class and background covariances / N (sklearn's MLE, as the reference), pseudo-inverse",
    )

    def __init__(self) -> None:
        self.means: Tensor | None = None
        self.precision: Tensor | None = None
        self.background_mean: Tensor | None = None
        self.background_precision: Tensor | None = None

    def fit(self, model: FeatureModel, data: FitData) -> RMDS:
        train = train_outputs(data, "rmds", labels=True)
        f = as_float(train.features).double()
        c = train.logits.shape[1]
        require_samples(len(f), c + 1, "rmds", None, f"a tied covariance over {c} classes")
        labels = train.labels.to(f.device).long()
        counts = per_class_counts(labels, c, "rmds").to(f.device, f.dtype)
        self.means = torch.zeros(c, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, labels, f) / counts[:, None]
        within = f - self.means[labels]
        self.precision = torch.linalg.pinv(within.T @ within / len(f), hermitian=True)
        self.background_mean = f.mean(0)
        centred = f - self.background_mean
        self.background_precision = torch.linalg.pinv(centred.T @ centred / len(f), hermitian=True)
        return self

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        if self.means is None:
            raise RuntimeError("RMDS.score called before fit")
        f = as_float(outputs.features).double()
        dev = f.device
        md_k = _squared_mahalanobis(f, self.means.to(dev), self.precision.to(dev))
        md_0 = _squared_mahalanobis(f, self.background_mean.to(dev)[None], self.background_precision.to(dev))
        return -(md_k - md_0).amin(-1)
