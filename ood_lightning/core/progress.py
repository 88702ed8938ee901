"""Progress of the long stages, through one helper: a split's forward pass (features, a VAE's IWAE
bounds), each scorer's fit and scoring, a latent flow's fit, a training epoch.

On a terminal each stage is a rich bar (count, rate, time left). In a log file or a pipe rich bars
do not draw, so a stage logs one line every ``every`` seconds while it runs (count, rate, ETA)
and one when it ends; a 40-minute scoring is then not 40 silent minutes.

    with Progress() as progress:                       # one display for a group of stages
        with progress.stage("features: id_test", total=10_000) as stage:
            for x, y in loader:
                ...
                stage.advance(len(y))

:func:`stage` joins the display of the enclosing ``Progress`` block, or makes its own for the
stage's duration, so code deep in a fit (a latent flow's steps) needs no progress argument.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar

import lightning as L
import rich
import rich.progress as rp
import torch
from lightning.pytorch.callbacks import RichProgressBar
from rich.console import Console
from rich.text import Text

from ood_lightning.core.cost import human

log = logging.getLogger(__name__)

#: seconds between two progress lines of a stage when the output is not a terminal
INTERVAL_S = 30.0

_active: ContextVar[Progress | None] = ContextVar("ood_lightning_progress", default=None)


class _Rate(rp.ProgressColumn):
    """``1,234 inputs/s`` (rich's own speed column counts bytes)."""

    def render(self, task: rp.Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {task.fields.get('unit', '')}/s" if speed else "", style="progress.data.speed")


def _fields_text(fields: dict) -> str:
    """Tensors are read here, when a line is written, not at every step (no host sync per step)."""
    def text(v) -> str:
        v = float(v) if torch.is_tensor(v) else v
        return f"{v:.4g}" if isinstance(v, float) else f"{v}"

    return " ".join(f"{k} {text(v)}" for k, v in fields.items())


class Progress:
    """The display of a group of stages: rich bars when ``console`` is a terminal (and ``bars``),
    else progress lines in the log. ``clock`` is injectable so the interval can be tested."""

    def __init__(self, console: Console | None = None, every: float = INTERVAL_S,
                 clock: Callable[[], float] = time.perf_counter, bars: bool = True) -> None:
        self.console = console if console is not None else rich.get_console()
        self.every, self.clock = float(every), clock
        self.terminal = bool(bars) and self.console.is_terminal
        self.bars: rp.Progress | None = None
        self._token = None
        self._rerouted: list = []

    def __enter__(self) -> Progress:
        if self.terminal:
            self.bars = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                                    _Rate(), rp.TimeRemainingColumn(), rp.TextColumn("{task.fields[info]}"),
                                    console=self.console, transient=True)
            streams = sys.stdout, sys.stderr
            self.bars.start()  # replaces sys.stdout / sys.stderr with proxies that print above the bars
            self._rerouted = _reroute_log_handlers(dict(zip(streams, (sys.stdout, sys.stderr))))
        self._token = _active.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.reset(self._token)
        if self.bars is not None:
            for handler, stream in self._rerouted:
                handler.setStream(stream)
            self.bars.stop()
            self.bars = None

    def stage(self, description: str, total: int, unit: str = "inputs", quiet_under: float = 0.0) -> Stage:
        return Stage(self, description, total, unit, quiet_under=quiet_under)


def _reroute_log_handlers(streams: dict) -> list:
    """Point the console log handlers (Hydra's writes to the real stdout) at rich's proxies while the
    bars draw, so a log line is printed above them instead of into them; returns what to restore."""
    rerouted = []
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and streams.get(handler.stream, handler.stream) is not handler.stream:
            rerouted.append((handler, handler.setStream(streams[handler.stream])))
    return rerouted


class Stage:
    """One stage of a :class:`Progress`: ``advance`` as work is done, ``finish`` (or leave the
    ``with`` block) at the end, which logs the count, the time and the rate, unless the stage
    took less than ``quiet_under`` seconds (a detector scored in milliseconds says nothing)."""

    def __init__(self, progress: Progress, description: str, total: int, unit: str = "inputs",
                 owns: bool = False, quiet_under: float = 0.0) -> None:
        self.progress, self.description, self.total, self.unit = progress, description, int(total), unit
        self.owns = owns  # a display made for this stage alone: closed with it
        self.quiet_under = float(quiet_under)
        self.start = self.last = progress.clock()
        self.done = 0
        self.fields: dict = {}
        bars = progress.bars
        self.task = bars.add_task(description, total=self.total, unit=unit, info="") if bars is not None else None
        self.closed = False

    def advance(self, n: int = 1, **fields) -> None:
        """``n`` more units done; ``fields`` (e.g. ``bpd=3.2``) are shown beside the count."""
        self.done += int(n)
        self.fields.update(fields)
        if self.task is not None:
            self.progress.bars.update(self.task, advance=n, info=_fields_text(self.fields))
            return
        now = self.progress.clock()
        if now - self.last >= self.progress.every and self.done < self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            extra = f" {_fields_text(self.fields)}" if self.fields else ""
            log.info("%s: %s/%s %s (%s/s, ETA %s)%s", self.description, f"{self.done:,}", f"{self.total:,}",
                     self.unit, _rate(rate), human((self.total - self.done) / max(rate, 1e-9)), extra)

    def finish(self) -> float:
        """Close the stage; returns its seconds. The closing line is logged on a terminal too (it
        stays when the bar goes)."""
        seconds = self.progress.clock() - self.start
        self._close()
        if seconds < self.quiet_under:
            return seconds
        extra = f"; {_fields_text(self.fields)}" if self.fields else ""
        log.info("%s: %s %s in %s (%s/s)%s", self.description, f"{self.done:,}", self.unit, human(seconds),
                 _rate(self.done / max(seconds, 1e-9)), extra)
        return seconds

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.task is not None:
            self.progress.bars.remove_task(self.task)
        if self.owns:
            self.progress.__exit__(None, None, None)

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.finish()
        else:  # the error says what happened; no closing line
            self._close()


def _rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"


def stage(description: str, total: int, unit: str = "inputs", progress: Progress | None = None,
          quiet_under: float = 0.0) -> Stage:
    """A stage of ``progress``, else of the enclosing :class:`Progress` block, else of a display of
    its own (closed with the stage)."""
    progress = progress if progress is not None else _active.get()
    if progress is not None:
        return progress.stage(description, total, unit, quiet_under)
    return Stage(Progress().__enter__(), description, total, unit, owns=True, quiet_under=quiet_under)


class TrainingBar(RichProgressBar):
    """Lightning's rich bar, on a terminal only (in a file or a pipe it would leave its last frame
    with the metrics wrapped over several lines; :class:`EpochProgress` writes lines there), and
    numbered as the log's epoch lines: ``Epoch 3/3``, not Lightning's 0-based ``Epoch 2/2``."""

    def __init__(self, console: Console | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.console = console

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        console = self.console if self.console is not None else rich.get_console()
        if not console.is_terminal:
            self.disable()
        super().setup(trainer, pl_module, stage)

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = f"/{self.trainer.max_epochs}" if self.trainer.max_epochs and self.trainer.max_epochs > 0 else ""
        return f"{f'Epoch {current_epoch + 1}{epochs}':{len(self.validation_description)}}"


class EpochProgress(L.Callback):
    """Training epochs in a log file or a pipe, where Lightning's rich bar does not draw: a line
    every ``every`` seconds (steps, rate, ETA of the epoch, the last step's loss) and one per epoch.
    Nothing on a terminal: the progress-bar callback draws there."""

    def __init__(self, every: float = INTERVAL_S, console: Console | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.every, self.console, self.clock = every, console, clock
        self._stage: Stage | None = None

    def _on(self, trainer: L.Trainer) -> bool:
        console = self.console if self.console is not None else rich.get_console()
        return trainer.is_global_zero and not console.is_terminal

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        if not self._on(trainer):
            return
        total = trainer.num_training_batches
        total = int(total) if total != float("inf") else 0
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        progress = Progress(console=self.console, every=self.every, clock=self.clock, bars=False)
        self._stage = Stage(progress, f"epoch {trainer.current_epoch + 1}{epochs}", total, "steps")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._stage is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs  # what training_step returned
        self._stage.advance(1, **({"loss": loss.detach()} if torch.is_tensor(loss) and loss.numel() == 1 else {}))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._stage is not None:
            self._stage.finish()
            self._stage = None
