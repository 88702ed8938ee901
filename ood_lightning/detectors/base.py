"""The post-hoc detector contract: ``fit`` on ID training outputs, ``score`` new ones.

Every score is *higher = more in-distribution*. Most detectors read only the cached
outputs of one forward pass (:class:`Outputs`), so ten detectors on one backbone cost
one pass over the data. Detectors that need the input itself (input perturbation, as in
ODIN) set ``needs_inputs = True`` and implement :meth:`Detector.score_inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor


class FeatureModel(Protocol):
    """What detectors may call on a model (every method in ``ood_lightning.methods`` has it)."""

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Named intermediate outputs; always contains ``"penultimate"`` ([B, D])."""

    def classify(self, features: Tensor) -> Tensor:
        """Classifier head: penultimate features [B, D] -> logits [B, C]."""

    def __call__(self, x: Tensor) -> Tensor:
        """Logits [B, C]."""


@dataclass
class Outputs:
    """Everything a detector may read about a set of inputs, from one forward pass.

    ``layers`` holds intermediate features already average-pooled to [N, D_l]
    (name -> tensor, in network order, ``"penultimate"`` last). ``extra`` holds per-input
    values a method computes from the inputs in the same pass (its ``input_scores``, e.g.
    a VAE's IWAE bound and ELBO terms).
    """

    logits: Tensor
    features: Tensor
    layers: dict[str, Tensor] = field(default_factory=dict)
    labels: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.logits.shape[0]

    def subset(self, index: Tensor) -> Outputs:
        return Outputs(self.logits[index], self.features[index], {k: v[index] for k, v in self.layers.items()},
                       None if self.labels is None else self.labels[index], {k: v[index] for k, v in self.extra.items()})


def pool(t: Tensor) -> Tensor:
    """Average-pool a feature map [B, C, H, W] (or any [B, C, ...]) to [B, C]."""
    return t.flatten(2).mean(-1) if t.ndim > 2 else t


class Detector:
    """Base class of post-hoc OOD detectors (higher score = more in-distribution)."""

    #: True when scores need the inputs (e.g. gradient-based input perturbation).
    needs_inputs: bool = False

    def fit(self, model: FeatureModel, train: Outputs) -> Detector:
        """Estimate whatever the detector needs from ID training outputs (default: nothing)."""
        return self

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        """Scores [N] from cached outputs."""
        raise NotImplementedError(f"{type(self).__name__} scores inputs, not cached outputs")

    def score_inputs(self, model: FeatureModel, x: Tensor) -> Tensor:
        """Scores [B] for a batch of preprocessed inputs (only when ``needs_inputs``)."""
        with torch.no_grad():
            feats = model.forward_features(x)
            out = Outputs(
                logits=model.classify(feats["penultimate"]),
                features=feats["penultimate"],
                layers={k: pool(v) for k, v in feats.items()},
            )
        return self.score(model, out)
