"""The CLI wrapper of both entrypoints: a failed run leaves ``failed.json`` and one clear line
(or lets a multirun sweep carry on), and W&B is closed whatever happened."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

from ood_lightning.core.errors import ConfigError, DiskFullError, OODLightningError
from ood_lightning.core.io import DISK_FULL
from ood_lightning.evaluation.run_dir import FAILED_FILE, write_failure

log = logging.getLogger(__name__)


def run_safely(fn, cfg: DictConfig):
    """Run ``fn(cfg)``; on failure write ``failed.json``, close loggers, and either exit with
    one clear line (single run) or carry on with the next job (multirun)."""
    out_dir = Path(cfg.paths.output_dir)
    logging.raiseExceptions = False  # a log file on a full disk: no traceback per log line
    try:
        return fn(cfg)
    except Exception as err:
        if isinstance(err, InstantiationException) and isinstance(err.__cause__, OODLightningError):
            err = err.__cause__  # a constructor's clear error, not Hydra's wrapper around it
        if isinstance(err, OSError) and not isinstance(err, OODLightningError) and err.errno in DISK_FULL:
            err = DiskFullError.of(err.filename or out_dir)  # a write outside io.atomic_write
        multirun = False
        try:
            multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        except ValueError:
            pass
        if not (isinstance(err, ConfigError) and not multirun and _remove_if_only_started(out_dir)):
            _record_failure(out_dir, err)
        if isinstance(err, OODLightningError):
            if multirun and err.sweep_continues:
                log.error("%s", err)
                return None
            _to_log_files(f"error: {err}")  # the console gets it once, below
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None
        if multirun:
            log.exception("run failed (details in %s/failed.json); continuing the sweep", out_dir)
            return None
        raise
    finally:
        _finish_wandb()


#: what a run folder holds before the run does anything: Hydra's config copy and log
STARTED_ONLY = {".hydra", "train.log", "evaluate.log", FAILED_FILE}


def _remove_if_only_started(out_dir: Path) -> bool:
    """A bad input ends a single run before it did anything: its folder (Hydra's files only) would look
    like a run, so it goes; the error line is the whole story. Returns whether it was removed."""
    try:
        if not out_dir.is_dir() or not {p.name for p in out_dir.iterdir()} <= STARTED_ONLY:
            return False
        shutil.rmtree(out_dir)
    except OSError:
        return False
    return True


def _to_log_files(message: str) -> None:
    """``message`` as an ERROR record in the run's log files (train.log) only, not on the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _record_failure(out_dir: Path, err: BaseException) -> None:
    """``failed.json``; where it cannot be written (a full disk), the record goes to stderr and the log."""
    fields = err.failure_fields() if isinstance(err, OODLightningError) else None
    try:
        write_failure(out_dir, err, fields)
    except OSError as write_err:
        record = json.dumps({"error": f"{type(err).__name__}: {err}", **(fields or {})})
        line = f"could not write {out_dir / FAILED_FILE} ({write_err.strerror or write_err}); the record: {record}"
        _to_log_files(line)
        print(line, file=sys.stderr)


def exit_on_error(main: Callable[[], object]) -> None:
    """Run a study or benchmark script's ``main``: a framework error ends it with its one line on
    stderr and its exit status, as the entrypoints do, instead of a traceback."""
    try:
        main()
    except OODLightningError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


def _finish_wandb() -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
