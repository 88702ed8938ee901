"""SIGTERM, what a cluster scheduler sends before it takes the machine: the run ends with a
checkpoint to resume from, ``failed.json`` saying ``"reason": "terminated"`` with the exact
command that resumes it, and a non-zero exit (143), instead of exiting 0 with nothing.

Inside ``fit``, Lightning's own SIGTERM handler (which calls the handler installed before it)
stops training after the current batch with ``SIGTERMException``; :class:`Preemption` then
saves ``checkpoints/terminated.ckpt`` in ``on_exception``, at that batch boundary, with the
data module's position in the epoch and every RNG state, so the resumed run goes on from the
next batch. A SIGTERM inside ``fit`` but before Lightning installs its handler (setup, restoring
a checkpoint) is passed on to it at ``on_train_start``. Outside ``fit`` (loading data, scoring) the handler raises at once; the resume
command then points at the last checkpoint there is (``last.ckpt`` once training is done).
"""

from __future__ import annotations

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

TERMINATED_CKPT = "terminated.ckpt"


def resume_command(checkpoint: Path | None, out_dir: Path) -> str:
    """``python train.py <the run's overrides> ckpt_path=<checkpoint>``, into the same run folder."""
    try:
        task = [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:  # outside Hydra: no overrides to repeat
        task = []
    task = [o for o in task if not o.lstrip("+~").startswith("ckpt_path=")]
    script = sys.argv[0] if Path(sys.argv[0]).name == "train.py" else "train.py"
    extra = [] if checkpoint is None else [f"ckpt_path={checkpoint}"]
    return shlex.join(["python", script, *task, *extra, f"hydra.run.dir={out_dir}"])


class Preemption(L.Callback):
    """Turns SIGTERM during :func:`~ood_lightning.run.runs.train` into :class:`RunTerminated`."""

    def __init__(self, out_dir: str | Path, resumed_from: str | None = None):
        self.out_dir = Path(out_dir)
        self.resumed_from = resumed_from
        self.checkpoint: Path | None = None
        self._in_fit = False
        self._pending = False  # SIGTERM came during fit (perhaps before Lightning's handler was there)

    # -- inside fit: Lightning stops after the batch; save where it stopped -----------------
    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            path = Path(trainer.default_root_dir) / "checkpoints" / TERMINATED_CKPT
            path.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(path, weights_only=False)  # the whole training state
            self.checkpoint = path

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if self._pending and not trainer.received_sigterm:
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
        finally:
            self._in_fit = False
        if self._pending:  # after training ended: resume from its last checkpoint
            raise self.error()

    # -- the process's handler ----------------------------------------------------------------
    def error(self) -> RunTerminated:
        checkpoint = self.checkpoint
        last = self.out_dir / "checkpoints" / "last.ckpt"
        if checkpoint is None and last.is_file():
            checkpoint = last
        if checkpoint is None and self.resumed_from:
            checkpoint = Path(self.resumed_from)
        return RunTerminated(checkpoint, resume_command(checkpoint, self.out_dir))

    def _handle(self, signum, frame) -> None:
        if self._in_fit:  # Lightning's handler, called before this one, stops after the current batch
            self._pending = True
            return
        raise self.error()

    @contextmanager
    def installed(self) -> Iterator[None]:
        """This handler for SIGTERM while the block runs (the main thread only can set one)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)
