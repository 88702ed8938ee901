"""Shared test helpers: the offline data root (skip where absent) and Hydra configs composed
in-process, as the entrypoints would compose them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import ood_lightning.config  # noqa: F401  (resolvers)
from ood_lightning.data.registry import default_data_root

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = Path(default_data_root())

#: a tiny image task that needs no data files: 9x9 stripes vs diagonal stripes, small CNN, CPU
TINY = ["data=stripes", "ood=diagonal_stripes", "backbone=cnn", "backbone.widths=[8,16]",
        "backbone.feature_dim=16", "trainer=cpu", "debug=fast", "logger=csv", "data.n_train=1200",
        "data.n_test=300", "data.val_size=200", "ood.diagonal.n=300"]


def needs_shared(*names: str):
    """Skip (saying why) when the offline packs are not beside the project, as on a user's machine."""
    missing = [n for n in names if not (SHARED_DATA / n).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"offline data not found under {SHARED_DATA}: {missing} "
                              "(set OOD_LIGHTNING_DATA to a folder with shared/data's packs)")


def compose_cfg(config_name: str, overrides: list[str], out_dir: Path):
    """Compose like ``@hydra.main`` would, with the run directory set to ``out_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=[*overrides, f"hydra.run.dir={out_dir}"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_script(script: str, *args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an entrypoint as a user would (a fresh interpreter)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
