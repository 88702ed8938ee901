"""``method=classifier``: a backbone and a linear head trained with cross-entropy.

The reference every OOD paper starts from; post-hoc detectors (MSP, ODIN, Energy,
ReAct, Mahalanobis) score its outputs after training.
"""

from __future__ import annotations

import torch.nn.functional as F

from ood_lightning.methods.base import OODMethod


class Classifier(OODMethod):
    def __init__(self, *args, label_smoothing: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_smoothing = label_smoothing

    def _step(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        acc = (logits.argmax(1) == y).float().mean()
        self.log_dict({f"{stage}/loss": loss, f"{stage}/acc": acc}, prog_bar=True, on_epoch=True,
                      on_step=False, batch_size=len(y), sync_dist=stage != "train")
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        self.check_finite(loss, {"ce": loss})
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")
