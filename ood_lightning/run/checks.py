"""Config checks that run before any data is read, each failing with one line that names the key
and what it accepts: sample limits, ``lambda``, the scoring device, the trainer's keys (a typo
such as ``trainer.max_epoch``, which Hydra would offer to append with ``+`` and Lightning then
refuses with a traceback), and a writable output folder (which Hydra's log set-up needs first).
"""

from __future__ import annotations

import difflib
import inspect
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from ood_lightning.core.errors import ConfigError

#: sample caps of the data group: null (all) or a positive count
_DATA_LIMITS = ("limit_train", "limit_val", "limit_test", "limit_ood")
#: Hydra's own instantiation keys, not constructor arguments
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
_TRAINER = "lightning.pytorch.trainer.Trainer"


def check_config(cfg: DictConfig) -> None:
    """Every check that needs only the composed config (``train.py`` and ``evaluate.py ckpt_path=``)."""
    data = cfg.get("data") or {}
    for key in _DATA_LIMITS:
        _check_limit(f"data.{key}", data.get(key))
    for name, spec in (cfg.get("ood") or {}).items():
        if spec is not None:
            _check_limit(f"ood.{name}.limit", spec.get("limit"))
    _check_limit("evaluation.fit_limit", (cfg.get("evaluation") or {}).get("fit_limit"))
    lam = cfg.get("lambda")
    if lam is not None and (not isinstance(lam, (int, float)) or isinstance(lam, bool) or lam < 0):
        raise ConfigError(f"lambda={lam}: the weight of the density term must be a number >= 0 "
                          "(or null for the method's default)")
    _check_device(str((cfg.get("evaluation") or {}).get("device", "auto")))
    if cfg.get("trainer") is not None:
        check_trainer_keys(cfg.trainer.keys(), str(cfg.trainer.get("_target_", _TRAINER)))


def _check_limit(key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value}: must be a whole number of samples >= 1, or null for all of them")


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


def check_writable(path: str | Path, key: str) -> None:
    """Create ``path`` if needed and write a probe file there; fail naming the folder and the key."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
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
