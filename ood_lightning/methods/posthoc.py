"""``method=lsgm`` / ``method=lde`` / ``method=posthoc``: a trained classifier, frozen.

Post-hoc methods never train the backbone: ``train.py`` loads ``backbone.checkpoint`` (a
``method=classifier`` run, or plain backbone weights), skips fitting, and the configured
detectors (LSGM, latent flows, baselines) do the work on its cached outputs.
"""

from __future__ import annotations

from torch import nn

from ood_lightning.methods.base import OODMethod


class PostHoc(OODMethod):
    trains_backbone = False

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__(backbone, num_classes, optimizer=None)
        head = backbone.pretrained_head
        if head is not None and head.out_features == num_classes:
            self.head = head  # ImageNet ID: the backbone's own 1000-way classifier
        self.requires_grad_(False)
