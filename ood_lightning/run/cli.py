"""The CLI wrapper of both entrypoints: a failed run leaves ``failed.json`` and one clear line
(or lets a multirun sweep carry on), and W&B is closed whatever happened."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

from ood_lightning.core.errors import OODLightningError
from ood_lightning.evaluation.run_dir import write_failure

log = logging.getLogger(__name__)


def run_safely(fn, cfg: DictConfig):
    """Run ``fn(cfg)``; on failure write ``failed.json``, close loggers, and either exit with
    one clear line (single run) or carry on with the next job (multirun)."""
    out_dir = Path(cfg.paths.output_dir)
    try:
        return fn(cfg)
    except Exception as err:
        if isinstance(err, InstantiationException) and isinstance(err.__cause__, OODLightningError):
            err = err.__cause__  # a constructor's clear error, not Hydra's wrapper around it
        write_failure(out_dir, err, err.failure_fields() if isinstance(err, OODLightningError) else None)
        multirun = False
        try:
            multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        except ValueError:
            pass
        if isinstance(err, OODLightningError):
            log.error("%s", err)
            if multirun and err.sweep_continues:
                return None
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None
        if multirun:
            log.exception("run failed (details in %s/failed.json); continuing the sweep", out_dir)
            return None
        raise
    finally:
        _finish_wandb()


def _finish_wandb() -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
