"""The ID data config's keys, their types and defaults, in one place: a structured config that
every ``conf/data/*.yaml`` extends (``defaults: [schema, _self_]``), so a misspelt or ill-typed
``data.*`` key fails at composition, naming the key, and code reads plain keys with no defaults of
its own. OOD sets are open-ended (each dataset takes its own arguments); the keys every set has
get their defaults from :data:`OOD_SET_DEFAULTS`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class AugmentConfig:
    #: random-crop padding in pixels (0 = no crop); training only
    crop_padding: int = 0
    hflip: bool = False
    #: zeros | reflect (the DHM authors' RandomCrop(padding_mode='reflect'))
    crop_padding_mode: str = "zeros"


@dataclass
class DataConfig:
    name: str = "???"
    root: str = "${paths.data_root}"
    download: bool = False
    cache_dir: str | None = None
    #: null = all classes; a list keeps those classes (relabelled 0..K-1), the rest form ood=near
    known_classes: list[int] | None = None
    #: a fraction of the training split (< 1) or a count of held-out validation samples
    val_size: Any = 0.1
    limit_train: int | None = None
    limit_val: int | None = None
    limit_test: int | None = None
    #: every OOD set's size cap (an OOD set's own ``limit`` wins)
    limit_ood: int | None = None
    split_seed: int = 0
    batch_size: int = 128
    eval_batch_size: int | None = None
    num_workers: int = 0
    #: gpu = whole split on the trainer's device, cpu = DataLoader, auto = gpu on CUDA when it fits
    loader: str = "auto"
    channels: int | None = None
    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    dequantize: bool = False
    #: extra arguments of the dataset loader (synthetic sets: noise level, ...)
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: sizes of generated sets (moons, rings, stripes)
    n_train: int | None = None
    n_test: int | None = None


#: what every OOD set config has besides its dataset's own arguments
OOD_SET_DEFAULTS = {"split": "test", "classes": None, "limit": None, "convert": None, "group": None}


def data_config(cfg: dict) -> dict:
    """``cfg`` (a plain dict, e.g. from a test or a stored run) over the schema's defaults; an unknown
    key is an error naming it and the closest known one."""
    import difflib
    from dataclasses import asdict, fields

    from ood_lightning.core.errors import ConfigError

    known = {f.name for f in fields(DataConfig)}
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(f"unknown key data.{key}" + (f"; did you mean data.{close[0]}?" if close else
                                                            f"; the data keys are {sorted(known)}"))
    out = {**asdict(DataConfig()), **cfg}
    out["augment"] = {**asdict(AugmentConfig()), **dict(cfg.get("augment") or {})}
    return out


def ood_set_config(spec: dict) -> dict:
    """An OOD set's config over :data:`OOD_SET_DEFAULTS`."""
    return {**OOD_SET_DEFAULTS, **spec}


def register_schema() -> None:
    """Idempotent: ``data/schema`` in Hydra's config store."""
    ConfigStore.instance().store(group="data", name="schema", node=DataConfig)
