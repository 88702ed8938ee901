"""Hydra/OmegaConf glue: custom resolvers and small helpers shared by the entrypoints."""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ood_lightning.core.pretrained import models_root
from ood_lightning.data.registry import default_data_root
from ood_lightning.data.schema import register_schema
from ood_lightning.run.typos import group_options


def _epochs_at(max_epochs: int, fractions) -> ListConfig:
    """Milestones at fractions of the schedule: 200 epochs x [0.3, 0.6, 0.8] -> [60, 120, 160].

    A ListConfig, not a list: ``OmegaConf.resolve`` (``--cfg job --resolve``) stores it in place."""
    return OmegaConf.create(sorted({max(1, int(round(float(f) * int(max_epochs)))) for f in fractions}))


def _epochs_every(max_epochs: int, step: int) -> ListConfig:
    """MultiStepLR milestones that make it StepLR(step_size=step): 250 epochs, step 100 -> [100, 200]."""
    return OmegaConf.create(list(range(int(step), int(max_epochs), int(step))))


def _smoke(fast, full, *, _root_):
    """``${smoke:FAST,FULL}``: FAST in a smoke run (the top-level ``smoke: true`` that debug=fast
    sets), else FULL; so each method's config names its own cut for a smoke run."""
    return fast if _root_.get("smoke", False) else full


def register_resolvers() -> None:
    """Idempotent: the project's resolvers and the data schema (``data/schema``)."""
    register_schema()
    _register_resolvers()


def _register_resolvers() -> None:
    """Idempotent: ``${ood_data_root:}``, ``${ood_models_root:}``, ``${epochs_at:max_epochs,[fractions]}`` and
    ``${epochs_every:max_epochs,step}``."""
    if not OmegaConf.has_resolver("ood_data_root"):
        OmegaConf.register_new_resolver("ood_data_root", default_data_root)
    if not OmegaConf.has_resolver("ood_models_root"):
        OmegaConf.register_new_resolver("ood_models_root", models_root)
    if not OmegaConf.has_resolver("epochs_at"):
        OmegaConf.register_new_resolver("epochs_at", _epochs_at)
    if not OmegaConf.has_resolver("epochs_every"):
        OmegaConf.register_new_resolver("epochs_every", _epochs_every)
    if not OmegaConf.has_resolver("help_groups"):  # the --help pages' list of groups and options
        OmegaConf.register_new_resolver("help_groups", group_options)
    if not OmegaConf.has_resolver("smoke"):
        OmegaConf.register_new_resolver("smoke", _smoke)


def compose(config_name: str, overrides: list[str], out_dir: str | Path, config_dir: str | Path) -> DictConfig:
    """The config ``@hydra.main`` hands the entrypoint ``config_name`` for ``overrides``, run directory
    ``out_dir``: for scripts and tests that call ``train``/``rescore`` in-process."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=[*overrides, f"hydra.run.dir={out_dir}"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


register_resolvers()
