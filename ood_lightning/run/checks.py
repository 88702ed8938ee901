"""Config checks that run before any data is read, each failing with one line that names the key
and what it accepts: sample limits, ``lambda``, the scoring device, the trainer's keys (a typo
such as ``trainer.max_epoch``, which Hydra would offer to append with ``+`` and Lightning then
refuses with a traceback), and a writable output folder (which Hydra's log set-up needs first).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from hydra._internal.utils import _locate  # get_object without its error log
from hydra.experimental.callback import Callback
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from ood_lightning.core.errors import ConfigError
from ood_lightning.data.registry import CLASS_COUNTS
from ood_lightning.evaluation.results import F1_THRESHOLD_SPLITS

log = logging.getLogger(__name__)

#: sample caps of the data group: null (all) or a positive count
_DATA_LIMITS = ("limit_train", "limit_val", "limit_test", "limit_ood")
#: Hydra's own instantiation keys, not constructor arguments
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
_TRAINER = "lightning.pytorch.trainer.Trainer"


def check_config(cfg: DictConfig, stored: bool = False) -> None:
    """The one up-front validation pass (``train.py`` and ``evaluate.py ckpt_path=``), before any data
    is read: every key a run reads is checked against what it accepts, and the first bad one ends the
    run with one line naming it and its valid range. ``stored``: ``data`` and ``ood`` may be left out
    (``evaluate.py`` then scores the checkpoint's own)."""
    data = cfg.get("data") or {}
    evaluation = cfg.get("evaluation") or {}
    _check_whole("seed", cfg.get("seed"), minimum=None)
    if data:  # evaluate.py without data=: the checkpoint's own data
        for key in _DATA_LIMITS:
            _check_limit(f"data.{key}", data.get(key))
        _check_whole("data.batch_size", data.get("batch_size"), minimum=1)
        _check_whole("data.eval_batch_size", data.get("eval_batch_size"), minimum=1, optional=True)
        _check_whole("data.num_workers", data.get("num_workers"), minimum=0)
        for key in ("n_train", "n_test"):
            _check_whole(f"data.{key}", data.get(key), minimum=1, optional=True)
        _check_known_classes(data)
    if "ood" not in cfg and not stored:
        raise ConfigError("ood=[] chooses no OOD set: pass ood=none for a run without OOD sets, or name some "
                          "(e.g. ood=[noise] or ood=[near,noise]; conf/ood lists them)")
    for name, spec in (cfg.get("ood") or {}).items():
        if spec is not None:
            _check_limit(f"ood.{name}.limit", spec.get("limit"))
            _check_whole(f"ood.{name}.n", spec.get("n"), minimum=1, optional=True, what="samples to generate")
    _check_limit("evaluation.fit_limit", evaluation.get("fit_limit"))
    tpr = evaluation.get("tpr", 0.95)
    if not _is_number(tpr) or not 0 < tpr < 1:
        raise ConfigError(f"evaluation.tpr={tpr}: the fraction of ID inputs the F1 threshold keeps must be a number "
                          "between 0 and 1 (exclusive), e.g. 0.95")
    f1 = evaluation.get("f1_threshold", "auto")
    if f1 not in ("auto", *F1_THRESHOLD_SPLITS):
        raise ConfigError(f"evaluation.f1_threshold={f1}: must be auto or one of {', '.join(F1_THRESHOLD_SPLITS)}")
    lam = cfg.get("lambda")
    if lam is not None and (not _is_number(lam) or lam < 0):
        raise ConfigError(f"lambda={lam}: the weight of the density term must be a number >= 0 "
                          "(or null for the method's default)")
    for group in ("method", "backbone"):
        _check_numbers(group, cfg.get(group))
    _check_device(str(evaluation.get("device", "auto")))
    _check_targets(cfg)
    if cfg.get("trainer") is not None:
        check_trainer_keys(cfg.trainer.keys(), str(cfg.trainer.get("_target_", _TRAINER)))
        _check_epochs(cfg)
    if cfg.get("paths") is not None and cfg.paths.get("cache_dir"):
        check_writable(cfg.paths.cache_dir, "paths.cache_dir", "(decoded data and feature caches)")


def ood_overlapping_id(cfg: DictConfig) -> dict[str, list[int] | str]:
    """OOD sets drawn from the ID dataset's own classes (``{set: the shared classes, or "all"}``): such
    a set is not out-of-distribution, and its numbers must not read as if it were."""
    data = cfg.get("data") or {}
    known = data.get("known_classes")
    out: dict[str, list[int] | str] = {}
    for name, spec in (cfg.get("ood") or {}).items():
        if spec is None or spec.get("dataset") != data.get("name") or spec.get("classes") == "unknown":
            continue
        classes = spec.get("classes")
        if classes is None:
            out[name] = "all" if known is None else sorted(int(c) for c in known)
        else:
            shared = sorted({int(c) for c in classes} & ({int(c) for c in known} if known is not None else {int(c) for c in classes}))
            if shared:
                out[name] = shared
    return out


def warn_ood_overlap(cfg: DictConfig) -> dict[str, list[int] | str]:
    """:func:`ood_overlapping_id`, with a warning per set (metrics.json records it as ``ood_overlaps_id``)."""
    overlaps = ood_overlapping_id(cfg)
    for name, classes in overlaps.items():
        log.warning("OOD set %r holds ID classes of %s (%s): it is not out-of-distribution; metrics.json marks it "
                    "in ood_overlaps_id", name, cfg.data.name, classes)
    return overlaps


def _check_limit(key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value}: must be a whole number of samples >= 1, or null for all of them")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_whole(key: str, value: Any, minimum: int | None, optional: bool = False, what: str = "") -> None:
    """A whole number (>= ``minimum``); ``optional``: or null."""
    if value is None and optional:
        return
    if isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum):
        return
    need = "a whole number" + (f" >= {minimum}" if minimum is not None else "") + (f" ({what})" if what else "")
    raise ConfigError(f"{key}={value}: must be {need}" + (", or null" if optional else ""))


def _check_known_classes(data) -> None:
    known = data.get("known_classes")
    if known is None:
        return
    count = CLASS_COUNTS.get(str(data.get("name")))
    valid = f"0..{count - 1}" if count else "class indices >= 0"
    if (not isinstance(known, (list, ListConfig)) or not known
            or any(not isinstance(c, int) or isinstance(c, bool) or c < 0 or (count and c >= count) for c in known)
            or len(set(known)) != len(known)):
        raise ConfigError(f"data.known_classes={list(known) if isinstance(known, (list, ListConfig)) else known}: "
                          f"must be null (all classes) or a non-empty list of distinct classes of "
                          f"{data.get('name')} ({valid})")


#: numeric keys at any depth of ``method`` / ``backbone`` (optimisers, flows, spectral bounds): (test, range)
_NUMBERS = {"lr": (lambda v: v > 0, "a number > 0"),
            "weight_decay": (lambda v: v >= 0, "a number >= 0"),
            "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
            "spectral_coeff": (lambda v: v > 0, "a number > 0 (the bound on each layer's operator norm), or null for no bound")}


def _check_numbers(where: str, node: Any) -> None:
    if isinstance(node, (dict, DictConfig)):
        for key, value in node.items():
            path = f"{where}.{key}"
            rule = _NUMBERS.get(str(key))
            if rule is not None and value is not None and not (_is_number(value) and rule[0](value)):
                raise ConfigError(f"{path}={value}: must be {rule[1]}")
            _check_numbers(path, value)


def _check_targets(cfg: DictConfig) -> None:
    """Every ``_target_`` of the run names something that exists (a typo in a detector would
    otherwise surface only after training)."""
    for group in ("method", "backbone", "detectors", "callbacks", "logger"):
        node = cfg.get(group)
        node = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
        for where, target in _targets(node, group):
            try:
                _locate(str(target))
            except Exception:  # noqa: BLE001 - Hydra raises ImportError or its own wrapper
                known = [f"ood_lightning.detectors.{n}" for n in _detector_names()] if group == "detectors" else []
                close = difflib.get_close_matches(str(target), known, n=1)
                hint = f"did you mean {close[0]}?" if close else "check the module path and class name"
                raise ConfigError(f"{where}._target_={target}: no such class or function; {hint}") from None


def _targets(node: Any, where: str):
    if isinstance(node, (dict, DictConfig)):
        if "_target_" in node:
            yield where, node.get("_target_")
        for key, value in node.items():
            if key != "_target_":
                yield from _targets(value, f"{where}.{key}")


def _detector_names() -> list[str]:
    import ood_lightning.detectors as detectors

    return list(getattr(detectors, "__all__", []))


def _check_epochs(cfg: DictConfig) -> None:
    """A method that trains needs epochs: ``trainer.max_epochs=0`` would score an untrained network."""
    epochs = cfg.trainer.get("max_epochs")
    if epochs is None:
        return
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < -1:
        raise ConfigError(f"trainer.max_epochs={epochs}: must be a whole number >= 1 (or -1: until stopped)")
    target = (cfg.get("method") or {}).get("_target_")
    trains = bool(getattr(_locate(str(target)), "trains_backbone", True)) if target else True
    if epochs == 0 and trains:
        raise ConfigError("trainer.max_epochs=0 would score an untrained network: pass trainer.max_epochs >= 1 "
                          "(post-hoc methods, method=posthoc with backbone.checkpoint=..., need no epochs)")


def _check_device(name: str) -> None:
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"evaluation.device={name}: not a device; pass auto, cpu or cuda[:<index>]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"evaluation.device={name} but no CUDA device is visible: pass evaluation.device=cpu "
                          "(or auto: cuda when there is one)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"evaluation.device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible")


def check_trainer_keys(keys: Iterable[str], target: str = _TRAINER) -> None:
    """Every ``trainer.<key>`` must be an argument of the trainer's constructor (its signature is the schema)."""
    params = inspect.signature(get_class(target).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    names = [n for n in params if n != "self"]
    for key in keys:
        if key not in names and key not in _HYDRA_KEYS:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]}?" if close else f"the trainer takes: {', '.join(sorted(names))}"
            raise ConfigError(f"unknown key {key} in trainer; {hint}")


def check_cli_overrides(argv: list[str]) -> None:
    """``trainer.<key>=`` overrides on the command line, checked before Hydra composes the config
    (whose own error for a typo suggests ``+trainer.<key>``, which Lightning then refuses)."""
    keys = []
    for arg in argv:
        name = arg.split("=", 1)[0]
        if "=" in arg and not name.startswith("~") and name.lstrip("+").startswith("trainer."):
            keys.append(name.lstrip("+").split(".")[1])
    if keys:
        try:
            check_trainer_keys(keys)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None


def check_writable(path: str | Path, key: str, what: str = "") -> None:
    """Create ``path`` if needed and write a probe file there; fail naming the folder and the key."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        if what:
            raise ConfigError(f"cannot write to {key}={path} {what} ({err.strerror or err}): pass {key}=<a writable "
                              "folder>") from None
        raise ConfigError(f"cannot write to the output folder {path} ({err.strerror or err}): pass {key}=<a writable "
                          "folder> (or paths.log_dir=...)") from None


class OutputDirCheck(Callback):
    """A Hydra callback: the run (or sweep) folder is writable, checked before Hydra sets up its
    log file there (which would otherwise fail with a traceback from ``logging.config``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        try:
            check_writable(OmegaConf.select(config, key), key)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
