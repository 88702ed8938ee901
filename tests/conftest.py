"""Shared test helpers: the offline data root (skip where absent), Hydra configs composed
in-process as the entrypoints would compose them, and a run's metrics.json checked against
scikit-learn on its saved scores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from ood_lightning.data.registry import default_data_root
from ood_lightning.run.config import compose  # also registers the config resolvers

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
    return compose(config_name, overrides, out_dir, CONF)


def untrained_run(overrides: list[str], out_dir: Path):
    """(cfg, data module set up for fitting, model built without pretrained weights and connected to
    it): what an in-process evaluation test scores, as the run's assembly builds it."""
    from ood_lightning.data.datamodule import OODDataModule
    from ood_lightning.run.build import build_model, connect

    cfg = compose_cfg("train", overrides, out_dir)
    dm = OODDataModule(cfg.data, cfg.ood)
    dm.setup("fit")
    model = build_model(cfg, dm.num_classes, pretrained=False)
    connect(dm, model)
    return cfg, dm, model


def run_script(script: str, *args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an entrypoint as a user would (a fresh interpreter)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def sklearn_auroc(id_scores, ood_scores) -> float:
    """The independent AUROC: scikit-learn's, with ID as the positive class (higher = more ID)."""
    return roc_auc_score(np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))], np.r_[id_scores, ood_scores])


def check_reported_metrics(written: dict, scores, ood: str, detectors, num_classes: int, tpr: float = 0.95,
                           threshold_split: str = "id_val") -> None:
    """metrics.json against scikit-learn on the run's saved scores.npz: AUROC with ID as the positive
    class, and the open-set macro-F1 over the C classes plus "unknown" (label C) at the threshold that
    keeps ``tpr`` of the ID *validation* scores (``threshold_split="id_train"``: of the fit set's
    scores, ``fit/<det>``), found here by direct counting."""
    labels = scores["labels/id_test"]
    for det in detectors:
        id_s, ood_s = scores[f"{det}/id_test"], scores[f"{det}/{ood}"]
        m = written["results"][det][ood]
        auroc = sklearn_auroc(id_s, ood_s)
        assert m["auroc"] == pytest.approx(auroc, abs=1e-12), det
        assert written["f1_threshold"]["split"][det] == threshold_split, det
        val = scores[f"{det}/id_val"] if threshold_split == "id_val" else scores[f"fit/{det}"]
        # the largest ID-validation score that still keeps >= tpr of them (integer counts, no rounding)
        t = max(c for c in np.unique(val) if np.sum(val >= c) * 100 >= round(tpr * 100) * len(val))
        id_p, ood_p = scores[f"preds/{det}/id_test"], scores[f"preds/{det}/{ood}"]
        y_true = np.r_[labels, np.full(len(ood_s), num_classes)]
        y_pred = np.r_[np.where(id_s >= t, id_p, num_classes), np.where(ood_s >= t, ood_p, num_classes)]
        assert 0 < np.mean(y_pred == num_classes) < 1  # the threshold rejects some inputs and accepts others
        f1 = f1_score(y_true, y_pred, average="macro")  # over the labels present in truth or predictions
        assert m["macro_f1"] == pytest.approx(f1, abs=1e-12), det


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny tensors (threads only contend on a busy 2-core box);
    module scope, so the module's other fixtures run under it too. Use with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
