"""Collapse monitor: warn when the flow's log-determinant jumps between epochs.

Schlumbom & Frank saw the mean log-det go from 0.12 to 1113 when λ crossed
3.59e-3 → 3.67e-3: the extractor shrinks the features until the flow's density is
huge everywhere, and OOD AUROC falls to chance. A jump by more than ``factor`` of the
epoch mean (and by more than ``min_change`` nats) is reported as a warning and logged.
"""

from __future__ import annotations

import logging
import math

import lightning as L

log = logging.getLogger(__name__)


class CollapseMonitor(L.Callback):
    def __init__(self, key: str = "train/logdet", factor: float = 10.0, min_change: float = 5.0):
        self.key, self.factor, self.min_change = key, factor, min_change
        self.previous: float | None = None
        self.events: list[dict] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.key)
        if value is None:
            return
        value = float(value)
        prev, self.previous = self.previous, value
        if prev is None or not math.isfinite(value):
            return
        ratio = abs(value) / max(abs(prev), 1e-12)
        if ratio > self.factor and abs(value - prev) > self.min_change:
            event = {"epoch": trainer.current_epoch, "from": prev, "to": value, "ratio": ratio}
            self.events.append(event)
            pl_module.log("train/collapse", 1.0)
            log.warning("%s jumped from %.4g to %.4g (x%.0f) at epoch %d: the density head may have collapsed "
                        "(features shrunk; OOD AUROC near chance). Try a smaller lambda.",
                        self.key, prev, value, ratio, trainer.current_epoch)
