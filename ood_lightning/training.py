"""The body of ``train.py``: build data, model, trainer from the config, fit, then score
the ID test set and every OOD set with the method's own scores and the post-hoc detectors.

Results are written before anything else can fail, and a failed run leaves
``failed.json`` in its run directory instead of taking a multirun sweep down with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import traceback
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ood_lightning.checkpoints import OPT_IN, load_state_strict, read_checkpoint, to_project_layout
from ood_lightning.config import to_dict
from ood_lightning.data.datamodule import OODDataModule
from ood_lightning.errors import ConfigError, InvalidCheckpointError, OODLightningError
from ood_lightning.evaluation.feature_cache import FeatureCache
from ood_lightning.evaluation.run import compute_metrics, print_results, score_everything, write_results_and_report
from ood_lightning.nn.spectral import apply_spectral_norm
from ood_lightning.pretrained import check_input_normalisation

log = logging.getLogger(__name__)


def build_backbone(cfg: DictConfig) -> torch.nn.Module:
    """``cfg.backbone`` without its weights: ``backbone.spectral_coeff`` (not a constructor
    argument) bounds every conv/linear to operator norm <= c (Gouk et al.)."""
    spec = OmegaConf.to_container(cfg.backbone, resolve=True)
    for key in ("checkpoint", "input_mean", "input_std"):  # facts about the weights, not constructor arguments
        spec.pop(key, None)
    spectral_coeff = spec.pop("spectral_coeff", None)
    backbone = instantiate(spec)
    if spectral_coeff is not None:
        apply_spectral_norm(backbone, float(spectral_coeff))
    return backbone


def build_model(cfg: DictConfig, num_classes: int, pretrained: bool = True):
    """Backbone + method from the config (the method gets the backbone and class count).

    Methods with a density term read the top-level ``lambda`` through their own config
    (``lambda_: ${lambda}``), so the config stays the only place for hyperparameters.
    """
    checkpoint = cfg.backbone.get("checkpoint")
    check_input_normalisation(cfg.backbone, cfg.data)
    model = instantiate(cfg.method, backbone=build_backbone(cfg), num_classes=num_classes)
    if checkpoint and pretrained:
        load_pretrained(model, checkpoint, allow_unsafe=bool(cfg.get(OPT_IN, False)))
    elif pretrained and not model.trains_backbone:
        choice = _choices().get("method", "posthoc")
        raise ConfigError(f"method={choice} is post-hoc (the backbone is not trained): pass "
                          "backbone.checkpoint=<classifier run>/checkpoints/last.ckpt")
    model.run_config = to_dict(cfg)
    return model


def load_pretrained(model, path: str | Path, allow_unsafe: bool = False) -> None:
    """Backbone (and classifier head, if present) weights from a ``method=classifier``
    checkpoint, or a state_dict file in a third-party layout (``checkpoints.to_project_layout``)."""
    path = Path(path)
    state = read_checkpoint(path, allow_unsafe, key="backbone.checkpoint", hint="pass the .ckpt of a method=classifier "
                            "run (<run_dir>/checkpoints/last.ckpt) or a state_dict file")
    state = to_project_layout(state, model.backbone.state_dict().keys(), source=str(path))
    backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    head_state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    load_state_strict(model.backbone, backbone_state, path, "backbone")
    if head_state and getattr(model, "loads_classifier_head", True):
        load_state_strict(model.head, head_state, path, "classifier head")
    elif not model.trains_backbone:
        log.warning("%s has no classifier head: logit-based detectors (MSP, ODIN, Energy) see an untrained head", path)


def build_detectors(cfg: DictConfig) -> dict:
    return {name: instantiate(spec) for name, spec in (cfg.get("detectors") or {}).items() if spec is not None}


def load_weights(model: torch.nn.Module, ckpt_path: str | Path, allow_unsafe: bool = False) -> None:
    """Load a Lightning checkpoint's weights; a mismatch names the differing keys and the fix."""
    path = Path(ckpt_path)
    state = read_checkpoint(path, allow_unsafe, key="ckpt_path", hint="pass ckpt_path=<run_dir>/checkpoints/last.ckpt")
    if not isinstance(state.get("state_dict"), dict):
        raise InvalidCheckpointError(f"not a valid checkpoint: {path} (no Lightning state_dict; pass "
                                     "ckpt_path=<run_dir>/checkpoints/last.ckpt of a train.py run)")
    load_state_strict(model, state["state_dict"], path, "model")


def feature_cache(cfg: DictConfig, model) -> FeatureCache | None:
    """A cache of outputs per fixed checkpoint (post-hoc methods), so that every later
    detector or flow run on it skips the backbone; off for runs that train (new weights)."""
    ckpt = cfg.backbone.get("checkpoint")
    if model.trains_backbone or not ckpt or not cfg.evaluation.get("feature_cache", True):
        return None
    path = Path(ckpt).resolve()
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return FeatureCache(Path(cfg.paths.cache_dir) / "features" / f"{path.parent.parent.name}-{path.stem}-{tag}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


#: training steps between host reads of the loss on CUDA (one sync each; ~1 ms of a WRN step)
NAN_CHECK_EVERY_CUDA = 50


def apply_speedups(model, cfg: DictConfig, device: torch.device) -> dict:
    """The top-level ``channels_last`` and ``compile`` keys, applied to ``model.backbone`` for ``device``.

    - ``channels_last: auto|true|false``: NHWC weights and inputs for conv backbones (tensor
      cores read NHWC without transposes); ``auto`` = on CUDA only. Inputs are converted by a
      forward pre-hook on the backbone.
    - ``compile: false|true|{torch.compile kwargs}``: ``torch.compile`` of the backbone's
      ``__call__`` (``nn.Module.compile``, so state_dict keys and checkpoints are unchanged).
      Only the backbone: heads are one matmul, and the residual flow's training log-det
      (Russian-roulette series length drawn per step, ``autograd.grad`` inside the forward)
      breaks graphs on every step. Direct calls of ``forward_features`` (the evaluation's
      feature extraction) stay eager.

    On CPU with the defaults both are no-ops. Returns what was applied (for logs and the benchmark).
    """
    backbone = model.backbone
    applied = {"channels_last": False, "compile": False}
    choice = cfg.get("channels_last", "auto")
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in backbone.modules())
    if str(choice).lower() == "auto":
        choice = device.type == "cuda"
    if bool(choice) and has_conv:
        backbone.to(memory_format=torch.channels_last)
        backbone.register_forward_pre_hook(_channels_last_input)
        applied["channels_last"] = True
    options = cfg.get("compile", False)
    if options:
        kwargs = {} if options is True else to_dict(options)
        backbone.compile(**kwargs)
        applied["compile"] = kwargs or True
    if any(applied.values()):
        log.info("backbone speedups on %s: %s", device, applied)
    return applied


def set_nan_check_every(model, cfg: DictConfig, device: torch.device) -> int:
    """``nan_check_every: auto|k``: how often the loss is read on the host for the non-finite
    check (``methods/nonfinite.py``); ``auto`` = every step on the CPU (free there), every
    ``NAN_CHECK_EVERY_CUDA`` steps on CUDA (each read makes the host wait for the GPU)."""
    every = cfg.get("nan_check_every", "auto")
    if str(every).lower() == "auto":
        every = NAN_CHECK_EVERY_CUDA if device.type == "cuda" else 1
    model.nan_check_every = int(every)
    if model.nan_check_every > 1:
        log.info("the loss is read on the host every %d training steps (nan_check_every)", model.nan_check_every)
    return model.nan_check_every


def _channels_last_input(module: torch.nn.Module, args: tuple):
    x = args[0]
    if isinstance(x, torch.Tensor) and x.ndim == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def distributed_world_size() -> int:
    """Processes in the default process group (1 when none is initialised, e.g. before/without DDP)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def share_rank_zero_state(model: torch.nn.Module) -> None:
    """Give every rank rank 0's weights and buffers (what rank 0 saved as the checkpoint).

    After DDP training the parameters agree, but buffers need not: each rank's last forward
    updated its BatchNorm running statistics with its own batch after DDP's buffer broadcast.
    Distributed evaluation would otherwise score each block with a slightly different model.
    """
    dist = torch.distributed
    state = [{k: v.detach().cpu() for k, v in model.state_dict().items()} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(state, src=0)
    if dist.get_rank() != 0:
        model.load_state_dict(state[0])


def _choices() -> dict:
    try:
        return dict(HydraConfig.get().runtime.choices)
    except ValueError:
        return {}


def log_results(loggers, metrics: dict, plot: Path, step: int) -> None:
    """Send every metric (``ood/<detector>/<set>/<metric>``) and the histogram plot to the loggers."""
    flat = {f"ood/{det}/{ood}/{k}": v for det, rows in metrics["results"].items() for ood, m in rows.items()
            for k, v in m.items()}
    if metrics.get("accuracy") is not None:
        flat["test/acc"] = metrics["accuracy"]
    for logger in loggers:
        logger.log_metrics(flat, step=step)
        if type(logger).__name__ == "WandbLogger":
            logger.log_image(key="ood/score_histograms", images=[str(plot)])
        elif type(logger).__name__ == "TensorBoardLogger":
            import matplotlib.image as mpimg

            logger.experiment.add_image("ood/score_histograms", mpimg.imread(plot)[..., :3], step, dataformats="HWC")
        logger.save()


def check_accelerator(cfg: DictConfig) -> None:
    """Fail before any data is read when the config asks for a GPU this machine lacks."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA device is visible "
                          "(GPU presets such as experiment=dhm_cifar10 select trainer=gpu): add trainer=cpu to run on CPU")


def train(cfg: DictConfig) -> dict:
    """Fit the configured method, score it, write results; returns the metrics dict."""
    check_accelerator(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    dm = OODDataModule(cfg.data, cfg.ood)
    dm.setup("fit")
    model = build_model(cfg, dm.num_classes)
    loggers = [instantiate(v) for v in (cfg.get("logger") or {}).values() if v is not None]
    callbacks = [instantiate(v) for v in (cfg.get("callbacks") or {}).values() if v is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    for logger in loggers:
        logger.log_hyperparams(to_dict(cfg))
    if cfg.get("ckpt_path"):
        load_weights(model, cfg.ckpt_path, bool(cfg.get(OPT_IN, False)))  # a clear error before Lightning's own
    apply_speedups(model, cfg, trainer.strategy.root_device)
    set_nan_check_every(model, cfg, trainer.strategy.root_device)
    if model.trains_backbone:
        trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=not cfg.get(OPT_IN, False))
    # DDP: every rank scores its block of each split and the outputs are gathered before
    # detectors and metrics (evaluation.distributed); otherwise rank 0 scores everything
    distributed = distributed_world_size() > 1 and bool(cfg.evaluation.get("distributed", True))
    if not trainer.is_global_zero and not distributed:
        return {}
    device = resolve_device(cfg.evaluation.device)
    if distributed:
        share_rank_zero_state(model)
        if cfg.evaluation.device == "auto":
            device = trainer.strategy.root_device  # this rank's GPU
        log.info("OOD evaluation split over %d ranks (rank %d scores its block of each split on %s)",
                 distributed_world_size(), torch.distributed.get_rank(), device)
    ev = score_everything(model, dm, build_detectors(cfg), device, cfg.evaluation.fit_limit,
                          feature_cache(cfg, model), bool(cfg.evaluation.get("fit_augmented", False)),
                          distributed=distributed)
    if not trainer.is_global_zero:
        return {}
    groups = {name: spec.get("group") for name, spec in dm.ood_cfg.items() if spec.get("group")}
    metrics = compute_metrics(ev, cfg.evaluation.tpr, groups)
    choices = _choices()
    meta = {"method": choices.get("method"), "backbone": choices.get("backbone"), "data": cfg.data.name,
            "seed": int(cfg.seed), "lambda": cfg.get("lambda"), "epochs": trainer.current_epoch}
    write_results_and_report(out_dir, ev, meta, model, dm, resolve_device(cfg.evaluation.device))
    log_results(loggers, metrics, out_dir / "plots" / "scores.png", trainer.global_step)
    print_results(metrics)
    log.info("results written to %s", out_dir)
    return metrics


def _write_failure(out_dir: Path, err: BaseException) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "failed.json").write_text(json.dumps({"error": f"{type(err).__name__}: {err}",
                                                     "traceback": traceback.format_exc()}, indent=2))


def run_safely(fn, cfg: DictConfig):
    """Run ``fn(cfg)``; on failure write ``failed.json``, close loggers, and either exit with
    one clear line (single run) or carry on with the next job (multirun)."""
    out_dir = Path(cfg.paths.output_dir)
    try:
        return fn(cfg)
    except Exception as err:
        if isinstance(err, InstantiationException) and isinstance(err.__cause__, OODLightningError):
            err = err.__cause__  # a constructor's clear error, not Hydra's wrapper around it
        _write_failure(out_dir, err)
        multirun = False
        try:
            multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        except ValueError:
            pass
        if isinstance(err, OODLightningError):
            log.error("%s", err)
            if multirun:
                return None
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
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
