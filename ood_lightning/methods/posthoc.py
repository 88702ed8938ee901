"""``method=posthoc`` / ``method=lsgm``: a trained classifier, frozen, with optional own scorers.

Post-hoc methods never train the backbone: ``train.py`` loads ``backbone.checkpoint`` (a
``method=classifier`` run, plain backbone weights or a third-party layout), skips fitting,
and scores it with the configured detectors plus the method's ``scorers`` (e.g. LSGM and its
ablations), all on the cached outputs of one pass.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ood_lightning.methods.base import OODMethod
from ood_lightning.scoring.api import Scorer


class PostHoc(OODMethod):
    trains_backbone = False

    def __init__(self, backbone: nn.Module, num_classes: int, scorers: Mapping[str, Scorer] | None = None):
        super().__init__(backbone, num_classes, optimizer=None)
        head = backbone.pretrained_head
        if head is not None and head.out_features == num_classes:
            self.head = head  # ImageNet ID: the backbone's own 1000-way classifier
        self.requires_grad_(False)
        self._own_scorers = dict(scorers or {})

    def scorers(self) -> dict[str, Scorer]:
        return dict(self._own_scorers)
