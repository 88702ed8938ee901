"""AUROC of a method's own score against subsets of the OOD sets, every validation epoch
(DHM Fig. 3: the score collapses at large λ while accuracy stays), logged as ``val/auroc/<set>``."""

from __future__ import annotations

import lightning as L
from torch import Tensor

from ood_lightning.evaluation.metrics import auroc


class OODMonitor(L.Callback):
    """Given the data up front (ID validation and OOD images, uint8, and the preprocessing), so the
    model never reaches into the data module."""

    def __init__(self, id_images: Tensor, ood_images: dict[str, Tensor], preprocess, limit: int = 500) -> None:
        self.id_images = id_images[:limit]
        self.ood_images = {name: images[:limit] for name, images in ood_images.items()}
        self.preprocess = preprocess

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.ood_images:
            return
        prep = self.preprocess.to(pl_module.device)
        id_scores = pl_module.monitor_scores(prep(self.id_images.to(pl_module.device))).cpu().numpy()
        for name, images in self.ood_images.items():
            ood = pl_module.monitor_scores(prep(images.to(pl_module.device))).cpu().numpy()
            pl_module.log(f"val/auroc/{name}", auroc(id_scores, ood))
