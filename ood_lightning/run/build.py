"""Building the data, model, detectors, trainer and feature cache from a config, and reading
every checkpoint (the project's runs, plain state_dicts, third-party layouts)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ood_lightning.core.checkpoints import (
    OPT_IN,
    AtomicCheckpointIO,
    load_state_strict,
    read_checkpoint,
    to_project_layout,
)
from ood_lightning.core.errors import CheckpointMismatchError, ConfigError, InvalidCheckpointError
from ood_lightning.core.pretrained import check_input_normalisation
from ood_lightning.data.datamodule import OODDataModule
from ood_lightning.methods.base import OODMethod
from ood_lightning.methods.dhm.ood_monitor import OODMonitor
from ood_lightning.nn.spectral import apply_spectral_norm
from ood_lightning.run.config import to_dict
from ood_lightning.run.loggers import build_loggers
from ood_lightning.run.stored_config import check_stored_targets
from ood_lightning.scoring.api import Scorer
from ood_lightning.scoring.feature_cache import FeatureCache
from ood_lightning.scoring.fit_cache import FitCache

log = logging.getLogger(__name__)


def choices() -> dict:
    """The config groups chosen for this run (``method``, ``backbone``, ...), empty outside Hydra."""
    try:
        return dict(HydraConfig.get().runtime.choices)
    except ValueError:
        return {}


def build_data(cfg: DictConfig) -> OODDataModule:
    return OODDataModule(cfg.data, cfg.ood)


def build_backbone(cfg: DictConfig) -> torch.nn.Module:
    """``cfg.backbone`` without its weights: ``backbone.spectral_coeff`` (not a constructor
    argument) bounds every conv/linear to operator norm <= c (Gouk et al.) and, unless
    ``backbone.spectral_bn=false``, every BatchNorm's scale to <= c (DUE)."""
    spec = OmegaConf.to_container(cfg.backbone, resolve=True)
    for key in ("checkpoint", "input_mean", "input_std"):  # facts about the weights, not constructor arguments
        spec.pop(key, None)
    spectral_coeff = spec.pop("spectral_coeff", None)
    spectral_bn = bool(spec.pop("spectral_bn", True))
    backbone = instantiate(spec)
    if spectral_coeff is not None:
        apply_spectral_norm(backbone, float(spectral_coeff), batchnorm=spectral_bn, exempt=backbone.unbounded_layers())
    return backbone


def build_model(cfg: DictConfig, num_classes: int, pretrained: bool = True) -> OODMethod:
    """Backbone + method from the config (the method gets the backbone and class count);
    ``pretrained`` loads ``backbone.checkpoint`` when it is set."""
    checkpoint = cfg.backbone.get("checkpoint")
    check_input_normalisation(cfg.backbone, cfg.data)
    spec = OmegaConf.to_container(cfg.method, resolve=True)
    spec.pop("epochs", None)  # the method's epoch budget: read by trainer.max_epochs, not a constructor argument
    model = instantiate(spec, backbone=build_backbone(cfg), num_classes=num_classes)
    if checkpoint and pretrained:
        load_pretrained(model, checkpoint, allow_unsafe=bool(cfg.get(OPT_IN, False)))
    elif pretrained and not model.trains_backbone:
        choice = choices().get("method", "posthoc")
        raise ConfigError(f"method={choice} is post-hoc (the backbone is not trained): pass "
                          "backbone.checkpoint=<classifier run>/checkpoints/last.ckpt")
    model.run_config = to_dict(cfg)
    return model


def connect(dm: OODDataModule, model: OODMethod) -> None:
    """What the data module takes from the method, handed over here (the model never reads the data
    module, nor the data module the model): its preprocessing needs and its training batch sampler."""
    if model.input_overrides:
        log.info("%s: inputs %s (method.inputs, over data.*)", type(model).__name__, model.input_overrides)
        dm.preprocess = dm.preprocess.with_overrides(model.input_overrides)
    dm.batch_sampler_factory = model.train_batch_sampler


def build_detectors(cfg: DictConfig) -> dict[str, Scorer]:
    return {name: instantiate(spec) for name, spec in (cfg.get("detectors") or {}).items() if spec is not None}


def build_trainer(cfg: DictConfig, model: OODMethod, dm: OODDataModule,
                  extra_callbacks: list[L.Callback] = ()) -> tuple[L.Trainer, list]:
    """The trainer with the configured loggers and callbacks, the run's own (``extra_callbacks``,
    e.g. the SIGTERM checkpoint), plus the method's OOD monitor (given the data it needs here,
    so the model never reads the data module)."""
    loggers = build_loggers(cfg)  # W&B: the sweep's group, the job's overrides as its name
    callbacks = [instantiate(v) for v in (cfg.get("callbacks") or {}).values() if v is not None]
    callbacks += list(extra_callbacks)
    sets = model.monitor_ood.get("sets") or []
    if sets:
        names = list(dm.ood_sets) if sets == "all" else list(sets)
        callbacks.append(OODMonitor(dm.val_set.images, {n: dm.ood_sets[n].images for n in names}, dm.preprocess,
                                    int(model.monitor_ood.get("limit", 500))))
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}  # a full disk keeps last.ckpt
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **plugins)
    for logger in loggers:
        logger.log_hyperparams(to_dict(cfg))
    return trainer, loggers


def feature_cache(cfg: DictConfig, model: OODMethod) -> FeatureCache | None:
    """A cache of outputs per fixed checkpoint (post-hoc methods), so that every later
    detector or flow run on it skips the backbone; off for runs that train (new weights)."""
    ckpt = _cached_checkpoint(cfg, model)
    return None if ckpt is None else FeatureCache(Path(cfg.paths.cache_dir) / "features" / _checkpoint_folder(ckpt))


def _cached_checkpoint(cfg: DictConfig, model: OODMethod) -> str | None:
    """The fixed checkpoint whose passes (and fits) may be cached; None when the run trains the
    backbone, has no checkpoint, or turns the feature cache off."""
    ckpt = cfg.backbone.get("checkpoint")
    if model.trains_backbone or not ckpt or not cfg.evaluation.get("feature_cache", True):
        return None
    return ckpt


def _checkpoint_folder(ckpt: str) -> str:
    """A readable, unique folder name per checkpoint path (the caches' per-checkpoint roots)."""
    path = Path(ckpt).resolve()
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"{path.parent.parent.name}-{path.stem}-{tag}"


def fit_cache(cfg: DictConfig, model: OODMethod) -> FitCache | None:
    """Fitted detectors per checkpoint (``paths.cache_dir/fits``), wherever the feature cache is on and
    ``evaluation.fit_cache`` is true: a rerun then skips the fits as it skips the passes."""
    ckpt = _cached_checkpoint(cfg, model)
    if ckpt is None or not cfg.evaluation.get("fit_cache", True):
        return None
    return FitCache(Path(cfg.paths.cache_dir) / "fits" / _checkpoint_folder(ckpt))


def scorer_configs(cfg: DictConfig, model: OODMethod) -> dict[str, object]:
    """Each scorer's resolved config, for the fit cache's key: ``detectors.<name>`` for a detector;
    ``method.scorers.<name>`` for a method's own scorer when the method lists it there, else the whole
    ``method`` node (the scorer is built from it in code)."""
    def plain(node) -> object:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    method = cfg.method
    own_nodes = method.get("scorers") if isinstance(method.get("scorers"), DictConfig) else None
    configs: dict[str, object] = {}
    for name in model.scorers():
        node = own_nodes.get(name) if own_nodes is not None and name in own_nodes else None
        configs[name] = {"method": plain(method.get("_target_")), "scorer": plain(node)} if node is not None \
            else {"method": plain(method)}
    for name, spec in (cfg.get("detectors") or {}).items():
        if spec is not None:
            configs[name] = plain(spec)
    return configs


# -- checkpoints (every read goes through ood_lightning.core.checkpoints: weights_only) ----------------
def load_pretrained(model: OODMethod, path: str | Path, allow_unsafe: bool = False) -> None:
    """Backbone (and classifier head, if present) weights from a ``method=classifier``
    checkpoint, or a state_dict file in a third-party layout (``checkpoints.to_project_layout``)."""
    path = Path(path)
    state = read_checkpoint(path, allow_unsafe, key="backbone.checkpoint", hint="pass the .ckpt of a method=classifier "
                            "run (<run_dir>/checkpoints/last.ckpt) or a state_dict file")
    state = to_project_layout(state, model.backbone.state_dict().keys(), source=str(path))
    backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    head_state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    load_state_strict(model.backbone, backbone_state, path, "backbone")
    if head_state and model.loads_classifier_head:
        load_state_strict(model.head, head_state, path, "classifier head")
    elif not model.trains_backbone:
        log.warning("%s has no classifier head: logit-based detectors (MSP, ODIN, Energy) see an untrained head", path)


def load_weights(model: torch.nn.Module, ckpt_path: str | Path, allow_unsafe: bool = False) -> None:
    """Load a Lightning checkpoint's weights; a mismatch names the differing keys and the fix."""
    path = Path(ckpt_path)
    state = read_checkpoint(path, allow_unsafe, key="ckpt_path", hint="pass ckpt_path=<run_dir>/checkpoints/last.ckpt")
    if not isinstance(state.get("state_dict"), dict):
        raise InvalidCheckpointError(f"not a valid checkpoint: {path} (no Lightning state_dict; pass "
                                     "ckpt_path=<run_dir>/checkpoints/last.ckpt of a train.py run)")
    load_state_strict(model, state["state_dict"], path, "model")


def stored_config(ckpt_path: str | Path, allow_unsafe: bool = False,
                  opt_in: str = f"{OPT_IN}=true") -> DictConfig:
    """The resolved config a ``train.py`` checkpoint was trained with: the one reader of a stored
    config, which refuses any ``_target_`` the project does not name (``stored_config`` module)
    unless the user passes ``opt_in`` (``allow_unsafe``)."""
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path, allow_unsafe, key="ckpt_path", hint="pass ckpt_path=<run_dir>/checkpoints/last.ckpt")
    stored = ckpt.get("ood_lightning_config")
    if not isinstance(stored, dict):
        raise CheckpointMismatchError(f"checkpoint {path} has no stored ood-lightning config; was it written by train.py?")
    check_stored_targets(stored, f"ckpt_path={path}", allow_unsafe, opt_in)
    return OmegaConf.create(stored)
