"""Restartable sweeps (``skip_finished=true``): a re-launched sweep skips the jobs that already
finished with the same config and resumes the ones that left a checkpoint.

A job is *finished* when its folder holds a readable ``metrics.json`` (no ``failed.json``, a
``results`` mapping) whose ``config_hash`` equals the hash of the job's config now. Anything
else (no file, a truncated or corrupt one, another config's hash, an older run without a hash)
is never trusted: the job runs. A job that is not finished resumes from the newest of
``checkpoints/terminated.ckpt`` (SIGTERM), ``checkpoints/last.ckpt`` (end of each epoch) and
``hpc_ckpt_<n>.ckpt`` (Lightning's SLURM auto-requeue) that was written for the same config hash (:class:`ConfigHashStamp` puts it in every checkpoint).

The hash is the SHA-256 of the resolved config as sorted JSON, leaving out what says *where* a
run lives rather than *what* it computes (:data:`HASH_EXCLUDED`): every ``paths.*`` value is
replaced by a placeholder before resolving, so keys interpolated from them (``logger.*.save_dir``,
``callbacks.model_checkpoint.dirpath``, ``data.root``, the Hydra output folder) do not count
either, and moving a sweep folder or a data root keeps the hash.

DDP: a finished job is skipped by every rank alike (they read the same file before any of them
writes). When Lightning starts the other ranks itself, they start after rank 0 moved the old
results away, so they run, and they pick the same checkpoint as rank 0 (none is written before
``fit`` starts).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from ood_lightning.core.checkpoints import read_checkpoint
from ood_lightning.core.errors import OODLightningError
from ood_lightning.evaluation.run_dir import METRICS_FILE, JobIssue, read_metrics
from ood_lightning.run.preemption import TERMINATED_CKPT

log = logging.getLogger(__name__)

#: top-level keys left out of the hash: ``hydra`` (runtime: job number, output folder, overrides),
#: ``paths`` (where data, caches and outputs live), ``ckpt_path`` (where a run resumes from: a
#: resumed run ends bitwise where an uninterrupted one does) and ``skip_finished`` itself
HASH_EXCLUDED = ("hydra", "paths", "ckpt_path", "skip_finished")
#: the entry of ``metrics.json`` and of every checkpoint that holds the hash
HASH_KEY = "config_hash"


def config_hash(cfg: DictConfig) -> str:
    """16 hex digits of SHA-256 over the resolved config without :data:`HASH_EXCLUDED`."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        if isinstance(cfg.get("paths"), DictConfig):
            for key in list(cfg.paths.keys()):
                cfg.paths[key] = f"<paths.{key}>"  # what interpolates them resolves to the placeholder
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for key in HASH_EXCLUDED:
        resolved.pop(key, None)
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_metrics(out_dir: str | Path, wanted: str) -> dict | None:
    """The job's ``metrics.json`` when it is valid and holds the hash ``wanted``; else None, with
    one line saying why the job runs."""
    out_dir = Path(out_dir)
    found = read_metrics(out_dir)
    if isinstance(found, JobIssue):
        if (out_dir / METRICS_FILE).exists() or found.status == "failed":
            log.info("skip_finished: %s not trusted (%s: %s): the job runs", out_dir / METRICS_FILE,
                     found.status, found.reason)
        return None
    stored = found.get(HASH_KEY)
    if stored != wanted:
        log.info("skip_finished: %s was written for another config (config hash %s, now %s): the job runs",
                 out_dir / METRICS_FILE, stored, wanted)
        return None
    return found


def resumable_checkpoint(out_dir: str | Path, wanted: str, allow_unsafe: bool = False) -> Path | None:
    """The newest of ``checkpoints/terminated.ckpt``, ``checkpoints/last.ckpt`` and Lightning's SLURM
    ``hpc_ckpt_<n>.ckpt`` (in ``out_dir``, the trainer's root) written for the config hash ``wanted`` (an unreadable one, or one of another config, is passed over with a line)."""
    folder = Path(out_dir) / "checkpoints"
    candidates = [p for p in (folder / TERMINATED_CKPT, folder / "last.ckpt") if p.is_file()]
    candidates += sorted(Path(out_dir).glob("hpc_ckpt_*.ckpt"))  # Lightning's SLURM auto-requeue saves
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            stored = read_checkpoint(path, allow_unsafe, key="ckpt_path").get(HASH_KEY)
        except OODLightningError as err:
            log.warning("skip_finished: %s not resumed (%s)", path, err)
            continue
        if stored == wanted:
            return path
        log.info("skip_finished: %s was written for another config (config hash %s, now %s): not resumed",
                 path, stored, wanted)
    return None


class ConfigHashStamp(L.Callback):
    """Writes the run's config hash into every checkpoint it saves, so a re-launch with
    ``skip_finished=true`` resumes only from a checkpoint of the same config."""

    def __init__(self, value: str):
        self.value = value

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[HASH_KEY] = self.value
