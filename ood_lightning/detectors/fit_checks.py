"""Refusals shared by fitted detectors: no fit data, no labels, or fewer samples than a
hyperparameter needs each get one ConfigError line naming the key to change."""

from __future__ import annotations

import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.scoring.api import FitData, Outputs


def as_float(t: Tensor) -> Tensor:
    """Detached, at least float32 (half-precision logits saturate softmax and sums); float64 is kept."""
    t = t.detach()
    return t.to(torch.promote_types(t.dtype, torch.float32))


def train_outputs(data: FitData, detector: str, labels: bool = False) -> Outputs:
    """``data.train``, refusing None (and missing labels when ``labels``) with the fix."""
    if data.train is None:
        raise ConfigError(f"detectors.{detector} fits on ID training outputs, but FitData.train is None: "
                          "the evaluation must extract them (the scorer declares needs_fit)")
    if labels and data.train.labels is None:
        raise ConfigError(f"detectors.{detector} fits per class and needs labels in FitData.train.labels")
    if len(data.train) == 0:
        raise ConfigError(f"detectors.{detector} got an empty fit set: raise evaluation.fit_limit")
    return data.train


def require_samples(n: int, need: int, detector: str, key: str | None, why: str) -> None:
    """Refuse a fit set of ``n`` < ``need`` samples, naming the hyperparameter (if any) and the fit limit."""
    if n < need:
        name = f"detectors.{detector}.{key}" if key else f"detectors.{detector}"
        fix = f"lower {name} or raise evaluation.fit_limit" if key else "raise evaluation.fit_limit"
        raise ConfigError(f"{name}: {why} needs at least {need} fit samples, got {n}: {fix}")


def per_class_counts(labels: Tensor, num_classes: int, detector: str, need: int = 1, what: str = "fit sample") -> Tensor:
    """Samples per class 0..C-1, refusing a class with fewer than ``need`` (its statistics are undefined)."""
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"detectors.{detector}: fit labels must lie in 0..{num_classes - 1} (the logits' classes), "
                          f"got {int(labels.min())}..{int(labels.max())}")
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    short = [c for c in range(num_classes) if counts[c] < need]
    if short:
        raise ConfigError(f"detectors.{detector}: classes {short[:10]} have fewer than {need} {what}(s) "
                          f"(counts {counts[short[:10]].tolist()}): raise evaluation.fit_limit"
                          + (" or train the classifier longer" if what != "fit sample" else ""))
    return counts
