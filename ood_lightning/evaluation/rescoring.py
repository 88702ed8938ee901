"""Re-score a trained checkpoint with any detectors and OOD sets (``evaluate.py ckpt_path=``).

The model is rebuilt from the config stored in the checkpoint; data and OOD sets are the
checkpoint's unless the command line chooses others.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ood_lightning.checkpoints import OPT_IN, read_checkpoint
from ood_lightning.data.datamodule import OODDataModule
from ood_lightning.errors import CheckpointMismatchError
from ood_lightning.evaluation.run import compute_metrics, print_results, score_everything, write_results_and_report
from ood_lightning.pretrained import check_input_normalisation
from ood_lightning.training import build_detectors, build_model, load_weights, resolve_device

log = logging.getLogger(__name__)


def stored_config(ckpt_path: str | Path, allow_unsafe: bool = False) -> DictConfig:
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path, allow_unsafe, key="ckpt_path", hint="pass ckpt_path=<run_dir>/checkpoints/last.ckpt")
    if "ood_lightning_config" not in ckpt:
        raise CheckpointMismatchError(f"checkpoint {path} has no stored ood-lightning config; was it written by train.py?")
    return OmegaConf.create(ckpt["ood_lightning_config"])


def rescore(cfg: DictConfig) -> dict:
    """Load ``cfg.ckpt_path``, score with ``cfg.detectors`` on ``cfg.ood`` (or the stored sets)."""
    allow_unsafe = bool(cfg.get(OPT_IN, False))
    trained = stored_config(cfg.ckpt_path, allow_unsafe)
    data = cfg.data if cfg.get("data") else trained.data
    ood = cfg.ood if cfg.get("ood") is not None else trained.ood
    check_input_normalisation(trained.backbone, data)  # e.g. data=cifar10 for weights trained otherwise
    dm = OODDataModule(data, ood)
    dm.setup("test")
    model = build_model(trained, dm.num_classes, pretrained=False)  # the checkpoint holds every weight
    load_weights(model, cfg.ckpt_path, allow_unsafe)
    ev = score_everything(model, dm, build_detectors(cfg), resolve_device(cfg.evaluation.device),
                          cfg.evaluation.fit_limit)
    groups = {name: spec.get("group") for name, spec in dm.ood_cfg.items() if spec.get("group")}
    metrics = compute_metrics(ev, cfg.evaluation.tpr, groups)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    meta = {"checkpoint": str(cfg.ckpt_path), "data": data.name}
    write_results_and_report(out_dir, ev, meta, model, dm, resolve_device(cfg.evaluation.device))
    print_results(metrics)
    log.info("results written to %s", out_dir)
    return metrics
