"""SIGTERM, what a cluster scheduler sends before it takes the machine, and Ctrl-C (SIGINT): the
run ends with one line naming its folder, the checkpoint to resume from and the exact command
that resumes it, ``failed.json`` saying ``"reason": "terminated"`` (or ``"interrupted"``) with
them, and a non-zero exit (143, or 130 for Ctrl-C), instead of exiting 0 with nothing.

Ctrl-C stops at once, wherever the run is (checkpoints are written atomically, so the last one
is intact); the checkpoint named is the last one written. A second SIGTERM stops at once too.

Inside ``fit``, Lightning's own SIGTERM handler (which calls the handler installed before it)
stops training after the current batch with ``SIGTERMException``; :class:`Preemption` then
saves ``checkpoints/terminated.ckpt`` in ``on_exception``, at that batch boundary, with the
data module's position in the epoch and every RNG state, so the resumed run goes on from the
next batch. A SIGTERM inside ``fit`` but before Lightning installs its handler (setup, restoring
a checkpoint) is passed on to it at ``on_train_start``. Outside ``fit`` (loading data, scoring) the handler raises at once; the resume
command then points at the last checkpoint there is (``last.ckpt`` once training is done).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ood_lightning.core.errors import RunTerminated

log = logging.getLogger(__name__)

TERMINATED_CKPT = "terminated.ckpt"


def resume_command(checkpoint: Path | None, out_dir: Path, entry: str = "train.py") -> str:
    """``python train.py <the run's overrides> ckpt_path=<checkpoint>``, into the same run folder
    (``entry="evaluate.py"``: the same command again, its ``ckpt_path`` being its input)."""
    try:
        task = [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:  # outside Hydra: no overrides to repeat
        task = []
    extra = []
    if entry == "train.py":
        task = [o for o in task if not o.lstrip("+~").startswith("ckpt_path=")]
        extra = [] if checkpoint is None else [f"ckpt_path={checkpoint}"]
    script = sys.argv[0] if Path(sys.argv[0]).name == entry else entry
    return shlex.join(["python", script, *task, *extra, f"hydra.run.dir={out_dir}"])


class Preemption(L.Callback):
    """Turns SIGTERM or Ctrl-C during :func:`~ood_lightning.run.runs.train` (or, with
    ``entry="evaluate.py"``, during a re-scoring) into :class:`RunTerminated`."""

    def __init__(self, out_dir: str | Path, resumed_from: str | None = None, entry: str = "train.py"):
        self.out_dir = Path(out_dir)
        self.resumed_from = resumed_from
        self.entry = entry
        self.checkpoint: Path | None = None
        self._in_fit = False
        self._pending = False  # SIGTERM came during fit (perhaps before Lightning's handler was there)
        self._stopped_by: str | None = None  # the signal that stops the run at once (Ctrl-C, a second SIGTERM)
        self._resending = False

    # -- inside fit: Lightning stops after the batch; save where it stopped -----------------
    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            path = Path(trainer.default_root_dir) / "checkpoints" / TERMINATED_CKPT
            path.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(path, weights_only=False)  # the whole training state
            self.checkpoint = path

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if self._pending and not trainer.received_sigterm:
            self._resending = True  # not a second SIGTERM: ``_handle`` lets this one through
            os.kill(os.getpid(), signal.SIGTERM)  # again, now that Lightning's handler is installed

    @contextmanager
    def fitting(self) -> Iterator[None]:
        """Around ``trainer.fit``: SIGTERM there becomes :class:`RunTerminated` after the checkpoint."""
        self._in_fit = True
        try:
            with warnings.catch_warnings():
                # the data module starts a resumed epoch at its checkpoint's batch (OODDataModule.load_state_dict)
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
                yield
        except SIGTERMException:
            raise self.error() from None
        except SystemExit:  # Lightning ends fit with exit(1) after a KeyboardInterrupt (Ctrl-C, a second SIGTERM)
            if self._stopped_by is None:
                raise
            raise self.error(self._stopped_by) from None
        finally:
            self._in_fit = False
        if self._pending:  # after training ended: resume from its last checkpoint
            raise self.error()

    # -- the process's handler ----------------------------------------------------------------
    def error(self, signal_name: str = "SIGTERM") -> RunTerminated:
        checkpoint = self.checkpoint
        last = self.out_dir / "checkpoints" / "last.ckpt"
        if checkpoint is None and last.is_file():
            checkpoint = last
        if checkpoint is None and self.resumed_from:
            checkpoint = Path(self.resumed_from)
        trains = self.entry == "train.py"
        if not trains:
            checkpoint = None
        return RunTerminated(checkpoint, resume_command(checkpoint, self.out_dir, self.entry), self.out_dir,
                             signal_name, trains)

    def _handle(self, signum, frame) -> None:
        if self._resending:
            self._resending = False
            return
        if self._in_fit and not self._pending:  # Lightning's handler, called before this one, stops after the batch
            self._pending = True
            log.warning("SIGTERM: stopping after the current training step, to save a checkpoint to resume from "
                        "(send SIGTERM again, or Ctrl-C, to stop at once from the last checkpoint)")
            return
        if self._in_fit:  # a second SIGTERM: at once, as Ctrl-C
            self._stopped_by = "SIGTERM"
            raise KeyboardInterrupt
        raise self.error()

    def _handle_interrupt(self, signum, frame) -> None:
        """Ctrl-C: a KeyboardInterrupt, as Python's own handler raises (no ``except Exception`` swallows it);
        ``installed`` (or, inside fit, after Lightning's exit, ``fitting``) turns it into the error."""
        self._stopped_by = "SIGINT"
        raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[None]:
        """These handlers for SIGTERM and SIGINT while the block runs (the main thread only can set one)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, self._handle), signal.signal(signal.SIGINT, self._handle_interrupt)
        try:
            yield
        except KeyboardInterrupt:
            if self._stopped_by is None:
                raise
            raise self.error(self._stopped_by) from None
        finally:
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])
