"""The bodies of ``train.py`` (fit, then score) and ``evaluate.py ckpt_path=`` (re-score a
checkpoint); both end in :func:`score_and_write`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ood_lightning.core import provenance
from ood_lightning.core.checkpoints import OPT_IN
from ood_lightning.core.cpu_runtime import log_thread_choice
from ood_lightning.core.pretrained import check_input_normalisation
from ood_lightning.data.datamodule import OODDataModule
from ood_lightning.evaluation.results import (
    check_f1_threshold,
    compute_metrics,
    print_results,
    write_metrics,
    write_results,
)
from ood_lightning.evaluation.run_dir import clear_stale_results
from ood_lightning.methods.base import OODMethod
from ood_lightning.run.build import (
    build_data,
    build_detectors,
    build_model,
    build_trainer,
    choices,
    connect,
    feature_cache,
    fit_cache,
    load_weights,
    scorer_configs,
    stored_config,
)
from ood_lightning.run.checks import check_config, ood_overlapping_id, warn_ood_overlap
from ood_lightning.run.finished import ConfigHashStamp, config_hash, finished_metrics, resumable_checkpoint
from ood_lightning.run.loggers import finish_runs, log_results
from ood_lightning.run.preemption import Preemption
from ood_lightning.run.runtime import (
    apply_eval_layout,
    apply_eval_precision,
    apply_speedups,
    check_accelerator,
    resolve_device,
    set_nan_check_every,
    share_rank_zero_state,
)
from ood_lightning.scoring.feature_cache import FeatureCache
from ood_lightning.scoring.loop import score_all
from ood_lightning.scoring.ranks import SINGLE, Ranks

log = logging.getLogger(__name__)


def score_and_write(model: OODMethod, dm: OODDataModule, cfg: DictConfig, out_dir: Path, meta: dict,
                    device: torch.device, cache: FeatureCache | None = None, ranks: Ranks = SINGLE) -> dict | None:
    """Score every detector and the method's own scores, then write the run: the results first
    (so a failing method report loses nothing), then the report merged into ``metrics.json``.
    Returns the metrics on the main rank, None on the others."""
    apply_eval_layout(model, cfg, device)
    apply_eval_precision(model, cfg, device)
    f1_threshold = str(cfg.evaluation.get("f1_threshold", "auto"))
    f1_threshold = check_f1_threshold(model.f1_threshold_split if f1_threshold == "auto" else f1_threshold)
    fits = fit_cache(cfg, model) if cache is not None else None
    results = score_all(model, dm, build_detectors(cfg), device, cfg.evaluation.fit_limit, cache,
                        bool(cfg.evaluation.get("fit_augmented", False)), ranks,
                        train_scores=f1_threshold == "id_train" and model.has_classifier,
                        fit_cache=fits, configs=scorer_configs(cfg, model) if fits is not None else None)
    if not ranks.is_main:
        return None
    groups = {name: spec.get("group") for name, spec in dm.ood_cfg.items() if spec.get("group")}
    metrics = compute_metrics(results, cfg.evaluation.tpr, groups, f1_threshold)
    started = meta.pop("started", None)
    stage_s = meta.pop("stage_s", {})
    machine = provenance.machine()
    meta = {**meta, "provenance": {"command": provenance.command(), "commit": provenance.commit(), "machine": machine,
                                   "wall_s": None if started is None else round(time.time() - started, 1)},
            "setting": run_setting(cfg, dm, results, groups),
            "timings_s": {k: round(v, 3) for k, v in {**stage_s, **results.timings}.items()},
            "fit_samples": results.fit_samples, "fit_augmented": results.fit_augmented,
            "fit_splits": {name: {"augmented": aug, "samples": results.fit_samples}
                           for name, aug in results.fit_splits.items()},
            "selected": results.selected, "smoke": bool(cfg.get("smoke", False)),
            "ood_overlaps_id": ood_overlapping_id(cfg),
            "fit_cache": {"hits": sum(v == "cache" for v in results.fit_cache.values()),
                          "fitted": sum(v == "fitted" for v in results.fit_cache.values()),
                          "sources": results.fit_cache} if fits is not None else None}
    write_results(out_dir, results, metrics, extra=meta)
    report = model.report(out_dir, results, dm, device)
    artifacts = sorted(str(p.relative_to(out_dir)) for p in (Path(out_dir) / "plots").glob("*.png"))
    write_metrics(out_dir, metrics, {**meta, **report, "artifacts": artifacts})
    print_results(metrics, smoke=bool(cfg.get("smoke", False)))
    log.info("results written to %s", out_dir)
    return metrics


def run_setting(cfg: DictConfig, dm: OODDataModule, results, groups: dict[str, str]) -> dict:
    """What a results page and the paper view compare (``metrics.json`` ``setting``): the ID data
    (its set, encoding and class selection), the split sizes, every cut-down (limits, debug preset),
    the OOD sets with their groups, and per scorer its fit split and :meth:`Scorer.setting`."""
    from ood_lightning.data.registry import dataset_identity

    data = cfg.data
    id_set, encoding = dataset_identity(str(data.name))
    limits = {f"data.{k}": int(data[k]) for k in ("limit_train", "limit_val", "limit_test", "limit_ood")
              if data.get(k) is not None}
    if cfg.evaluation.get("fit_limit") is not None:
        limits["evaluation.fit_limit"] = int(cfg.evaluation.fit_limit)
    sizes = {split: None if getattr(dm, f"{split}_set") is None else len(getattr(dm, f"{split}_set"))
             for split in ("train", "val", "test")}
    members: dict[str, list[str]] = {}
    for name, group in groups.items():
        if name in dm.ood_sets:
            members.setdefault(group, []).append(name)
    scorers = {}
    for name in results.scorers():
        split = results.fit_splits.get(name)
        scorers[name] = {"fit": None if split is None else {"augmented": split, "samples": results.fit_samples},
                         **results.settings.get(name, {})}
    return {"id_data": {"name": str(data.name), "set": id_set, "encoding": encoding,
                        "known_classes": None if data.get("known_classes") is None else list(data.known_classes)},
            "splits": sizes, "limits": limits, "debug": choices().get("debug"),
            "ood": {name: {"dataset": str(dm.ood_cfg[name].get("dataset", name)), "group": groups.get(name),
                           "n": len(d)} for name, d in dm.ood_sets.items()},
            "groups": members, "scorers": scorers}


def train(cfg: DictConfig) -> dict:
    """Fit the configured method, score it, write results; returns the metrics dict. SIGTERM ends
    it with a checkpoint and the command that resumes it (``run.preemption``).

    ``skip_finished=true`` (a re-launched sweep): a job that already finished with this config
    returns its ``metrics.json`` without running; one that left a checkpoint of this config
    resumes from it (``run.finished``)."""
    log_thread_choice(log)
    digest = config_hash(cfg)
    if cfg.get("skip_finished"):
        done = _finished_or_resume(cfg, digest)
        if done is not None:
            return done
    preemption = Preemption(cfg.paths.output_dir, cfg.get("ckpt_path"))
    with preemption.installed():
        return _train(cfg, preemption, digest)


def _finished_or_resume(cfg: DictConfig, digest: str) -> dict | None:
    """The finished job's metrics, or None after pointing ``cfg.ckpt_path`` at a resumable checkpoint."""
    out_dir = Path(cfg.paths.output_dir)
    done = finished_metrics(out_dir, digest)
    if done is not None:
        log.info("skip_finished: skipped, %s already holds this config's results (config hash %s)",
                 out_dir / "metrics.json", digest)
        return done
    if not cfg.get("ckpt_path"):  # a checkpoint passed by hand wins
        ckpt = resumable_checkpoint(out_dir, digest, bool(cfg.get(OPT_IN, False)))
        if ckpt is not None:
            log.info("skip_finished: resuming from %s (same config hash %s)", ckpt, digest)
            with open_dict(cfg):
                cfg.ckpt_path = str(ckpt)
    return None


def _train(cfg: DictConfig, preemption: Preemption, digest: str) -> dict:
    started = time.time()
    clear_stale_results(cfg.paths.output_dir)  # a failure below must not leave an earlier attempt's numbers
    check_config(cfg)  # before any data is read
    check_accelerator(cfg)
    warn_ood_overlap(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the seed is in the saved config
    out_dir = Path(cfg.paths.output_dir)
    dm = build_data(cfg)
    dm.setup("fit")
    model = build_model(cfg, dm.num_classes)
    connect(dm, model)
    trainer, loggers = build_trainer(cfg, model, dm, extra_callbacks=[preemption, ConfigHashStamp(digest)])
    allow_unsafe = bool(cfg.get(OPT_IN, False))
    if cfg.get("ckpt_path"):
        load_weights(model, cfg.ckpt_path, allow_unsafe)  # a clear error before Lightning's own
    apply_speedups(model, cfg, trainer.strategy.root_device)
    set_nan_check_every(model, cfg, trainer.strategy.root_device)
    stage_s = {}
    if model.trains_backbone:
        start = time.perf_counter()
        with preemption.fitting():
            trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=not allow_unsafe)
        stage_s["train"] = time.perf_counter() - start
    # DDP: every rank scores its block of each split and the outputs are gathered before
    # scorers and metrics (evaluation.distributed); otherwise rank 0 scores everything
    ranks = Ranks.of_process_group(bool(cfg.evaluation.get("distributed", True)))
    if not trainer.is_global_zero and ranks.world == 1:
        return {}
    device = resolve_device(cfg.evaluation.device)
    if ranks.world > 1:
        share_rank_zero_state(model)
        if cfg.evaluation.device == "auto":
            device = trainer.strategy.root_device  # this rank's GPU
        log.info("OOD evaluation split over %d ranks (rank %d scores its block of each split on %s)",
                 ranks.world, ranks.rank, device)
    c = choices()
    meta = {"method": c.get("method"), "backbone": c.get("backbone"), "data": cfg.data.name,
            "seed": int(cfg.seed), "lambda": model.lambda_, "epochs": trainer.current_epoch,
            "config_hash": digest,  # what skip_finished=true compares on a re-launch
            "started": started, "stage_s": stage_s}
    metrics = score_and_write(model, dm, cfg, out_dir, meta, device, feature_cache(cfg, model), ranks)
    if metrics is None:
        return {}
    log_results(loggers, metrics, sorted((out_dir / "plots").glob("*.png")), trainer.global_step)
    finish_runs(loggers)
    return metrics


def rescore(cfg: DictConfig) -> dict:
    """Load ``cfg.ckpt_path``, score with ``cfg.detectors`` on ``cfg.ood`` (or the stored sets). SIGTERM
    or Ctrl-C ends it as it ends ``train``: one line, ``failed.json``, the command that re-runs it."""
    out_dir = HydraConfig.get().runtime.output_dir
    with Preemption(out_dir, entry="evaluate.py").installed():
        return _rescore(cfg)


def _rescore(cfg: DictConfig) -> dict:
    started = time.time()
    log_thread_choice(log)
    clear_stale_results(HydraConfig.get().runtime.output_dir)  # a failure below must not leave old numbers
    allow_unsafe = bool(cfg.get(OPT_IN, False))
    check_config(cfg, stored=True)  # before any data is read
    trained = stored_config(cfg.ckpt_path, allow_unsafe)
    data = cfg.data if cfg.get("data") else trained.data
    ood = cfg.ood if cfg.get("ood") is not None else trained.ood
    with open_dict(cfg):  # the detectors' ${data.*} (e.g. ODIN's input std) resolve against the data scored
        cfg.data, cfg.ood = data, ood
    check_input_normalisation(trained.backbone, data)  # e.g. data=cifar10 for weights trained otherwise
    warn_ood_overlap(cfg)
    dm = OODDataModule(data, ood)
    dm.setup("test")
    model = build_model(trained, dm.num_classes, pretrained=False)  # the checkpoint holds every weight
    connect(dm, model)
    load_weights(model, cfg.ckpt_path, allow_unsafe)
    meta = {"checkpoint": str(cfg.ckpt_path), "data": data.name, "started": started}
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    return score_and_write(model, dm, cfg, out_dir, meta, resolve_device(cfg.evaluation.device))
