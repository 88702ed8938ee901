"""Shared by the study scripts in sweeps/: run the real entrypoint (``train(cfg)`` on a config
composed from conf/ exactly as ``python train.py <overrides>`` would) and load what it wrote.

Each run directory also gets ``.hydra/config.yaml`` (resolved) and ``.hydra/overrides.yaml``, like
a Hydra run, so ``python evaluate.py run_dir=<study dir>`` aggregates the runs of a study too.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from ood_lightning.data.datamodule import OODDataModule
from ood_lightning.run.build import build_model, connect, load_weights
from ood_lightning.run.config import compose, to_dict  # also registers the config resolvers
from ood_lightning.run.runs import train

ROOT = Path(__file__).resolve().parents[1]


def compose_train(overrides: list[str], out_dir: str | Path) -> DictConfig:
    """The config ``python train.py <overrides>`` would run, with its run directory at ``out_dir``."""
    out_dir = Path(out_dir)
    cfg = compose("train", overrides, out_dir, ROOT / "conf")
    (out_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(to_dict(cfg)), out_dir / ".hydra" / "config.yaml")  # resolved
    (out_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    return cfg


def train_run(overrides: list[str], out_dir: str | Path):
    """Train with ``overrides`` into ``out_dir``; returns (metrics, trained model in eval mode, datamodule)."""
    cfg = compose_train(overrides, out_dir)
    metrics = train(cfg)
    model, dm = load_run(cfg, Path(out_dir) / "checkpoints" / "last.ckpt")
    return metrics, model, dm


def load_run(cfg: DictConfig, ckpt: str | Path):
    """The model of a finished run (weights from ``ckpt``) and its datamodule, set up for testing."""
    dm = OODDataModule(cfg.data, cfg.ood)
    dm.setup("test")
    model = build_model(cfg, dm.num_classes, pretrained=False)
    connect(dm, model)
    load_weights(model, ckpt)
    return model.eval(), dm


def log_progress(stream=None) -> bool:
    """Send INFO log lines (the epoch and scoring progress of ``ood_lightning.core.progress``) to
    ``stream`` (stdout): train.py gets this from Hydra's job logging, a study script run outside
    Hydra would otherwise train for an hour without a line. No-op when logging is already set up
    (a test's capture handler, an application's own config); returns whether it installed one."""
    root = logging.getLogger()
    if root.handlers:
        return False
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return True


def tag(value: float | None) -> str:
    """A file-name-safe short form of a number: 0.001 -> 1e-03, 3.0 -> 3."""
    if value is None:
        return "none"
    return f"{value:g}" if 1e-2 <= abs(value) < 1e4 or value == 0 else f"{value:.0e}"
