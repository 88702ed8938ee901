"""What a run will cost, said early: seconds per training step after the first few steps,
projected over the run, with what to do when a CPU run would take hours (issue: the first five
minutes of a newcomer on a 2-core machine)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import lightning as L

log = logging.getLogger(__name__)

#: the advice when a CPU run is projected past the threshold
CPU_ADVICE = ("for a smoke run add debug=fast; on a GPU machine trainer=gpu; or a smaller backbone "
              "(backbone=wrn28_2|cnn)")


def human(seconds: float) -> str:
    """``42 s``, ``7.5 min``, ``2.6 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class CostProjection(L.Callback):
    """After ``steps`` training steps (the first one, which warms up, not counted), log seconds per
    step, steps per epoch and the projected training time; past ``threshold_min`` minutes on a CPU
    the line says what to do. When the first step alone takes ``early_after_s`` seconds or more (a
    WRN-28-10 on a 2-core CPU), a first projection from that step comes at once, marked as such; and
    when the first *forward* pass alone takes a third of that, an estimate from it comes before the
    backward pass (a backward pass costs about two forward passes), so a newcomer learns the cost
    within the first minute. ``steps: 0`` switches it off; so does an epoch
    of no more than ``steps`` batches (debug=fast: nothing long to project).

    The first real validation then gives a second line (:attr:`with_validation`): seconds per step
    over every step of the epoch so far, plus the validation's own time (a DHM's validation computes
    exact log-dets and its OOD monitor scores; with the training steps alone a DHM projection was 3x
    optimistic), so the run's cost is said twice: early, and honestly."""

    def __init__(self, steps: int = 5, threshold_min: float = 30.0, early_after_s: float = 10.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.steps, self.threshold_min, self.clock = int(steps), float(threshold_min), clock
        self.early_after_s = float(early_after_s)
        self._fit_start: float | None = None
        self._start: float | None = None
        self._seen = 0
        self.early: str | None = None
        self.from_forward: str | None = None
        self.line: str | None = None
        self.with_validation: str | None = None
        self._val_start: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self._fit_start is None:
            self._fit_start = self.clock()

    def on_before_backward(self, trainer: L.Trainer, pl_module, loss) -> None:
        if (self.steps <= 0 or self._seen > 0 or self.from_forward is not None or self._fit_start is None
                or trainer.current_epoch > 0 or trainer.sanity_checking or trainer.num_training_batches <= self.steps):
            return
        forward = self.clock() - self._fit_start
        if 3 * forward >= self.early_after_s:
            self.from_forward = self._project(
                trainer, 3 * forward, "an estimate: 3 x the first forward pass, which includes warm-up")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (self.steps <= 0 or trainer.current_epoch > 0 or trainer.sanity_checking
                or trainer.num_training_batches <= self.steps):
            return
        self._seen += 1  # every step of the first epoch: the validation's line divides by all of them
        if self._seen == 1:  # the first step pays for allocation, compilation and caches
            self._start = self.clock()
            first = self._start - (self._fit_start if self._fit_start is not None else self._start)
            if first >= self.early_after_s:
                self.early = self._project(trainer, first, "from the first step, which includes warm-up")
            return
        if self.line is not None or self._seen - 1 < self.steps:
            return
        self.line = self._project(trainer, (self.clock() - self._start) / (self._seen - 1), f"{self._seen - 1} steps")

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.line is not None and self.with_validation is None and not trainer.sanity_checking:
            self._val_start = self.clock()

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._val_start is None or self.with_validation is not None or trainer.sanity_checking:
            return
        now = self.clock()
        steps = self._seen - 1
        per_step = (self._val_start - self._start) / steps
        every = getattr(trainer, "check_val_every_n_epoch", None) or 1
        val_per_epoch = (now - self._val_start) / every
        self.with_validation = self._project(
            trainer, per_step, f"{steps} steps, plus {human(now - self._val_start)} of validation every {every} "
            f"epoch(s)", extra_per_epoch=val_per_epoch)

    def _project(self, trainer: L.Trainer, per_step: float, basis: str, extra_per_epoch: float = 0.0) -> str:
        per_epoch = int(trainer.num_training_batches)
        epochs = int(trainer.max_epochs) if trainer.max_epochs and trainer.max_epochs > 0 else 1
        epoch_s = per_step * per_epoch + extra_per_epoch
        total = epoch_s * epochs
        device = trainer.strategy.root_device.type
        steps = f"{per_step:.2f} s/step x {per_epoch} steps/epoch"
        steps += f" + {human(extra_per_epoch)} validation" if extra_per_epoch else ""
        line = (f"projected: {steps} = {human(epoch_s)}/epoch, "
                f"{human(total)} for {epochs} epochs on {device} ({basis})")
        if device == "cpu" and total > 60 * self.threshold_min:
            line += f" - {CPU_ADVICE}"
            log.warning("%s", line)
        else:
            log.info("%s", line)
        return line
