"""A disk cache of fitted scorers, so a rerun on the same checkpoint skips the expensive fits
(LSGM's mixtures, a latent flow's training, an ε search) as the feature cache skips the passes.

Only scorers that declare :attr:`~ood_lightning.scoring.api.Scorer.fit_cacheable` are cached,
never a ``tunes_on_ood`` one. An entry is trusted only when its key is *exactly* the key of the
fit about to run; the key is a sha256 of everything the fit result depends on:

* the fit data, by content: a digest of every tensor of ``FitData.train`` (the fit split's
  outputs: logits, features, every pooled layer, labels) and of ``FitData.val_inputs`` (the ε
  searches read them), plus the model's weight fingerprint (ViM reads the head, an ε search runs
  the model) and, for the reader, the fit split's feature-cache key (dataset, split, transform
  tag: fit_limit, augmentation). Content, not names: a changed fit_limit, augmentation or backbone
  changes the bytes, so no naming slip can make a stale entry look current;
* the scorer's full resolved config (its Hydra node, seeds included) and its class;
* the scorer's code: a sha256 of the source of the scorer class's modules and every
  ``ood_lightning`` module they import, transitively (and of modules named by ``_target_`` in the
  config, e.g. the flow builder), with the torch / numpy / scikit-learn versions. A source hash
  rather than a declared version constant, because nobody has to remember to bump it: any edit to
  the code that could change a fit (or not) invalidates the entry, at the price of one refit;
* this file's :data:`FORMAT`.

Entries are one ``torch.save`` file of tensors and a JSON string (``root/<name>-<key16>.pt``), read
back with ``torch.load(weights_only=True)``: never unpickled. They are written atomically (temp
file + rename), so an interrupted run leaves no entry; a damaged one (truncated, foreign, another
key, a state the scorer refuses) is logged with a warning, removed and refitted. A readable
``<name>-<key16>.json`` beside it records the key's ingredients; it is never read to decide trust.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import pickle
import sys
import zipfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from ood_lightning.core.io import atomic_write, atomic_write_text
from ood_lightning.scoring.api import FitData, Outputs, Scorer, StateValue
from ood_lightning.scoring.feature_cache import flat_tensors, slug, tensor_digest

log = logging.getLogger(__name__)

#: bump when the entry layout or the key's recipe changes
FORMAT = 1
#: hex digits of the key in file names and log lines (the file itself holds the full key)
SHORT = 16
PACKAGE = "ood_lightning"
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
#: what a damaged entry raises when read or restored
_CORRUPT = (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
            pickle.UnpicklingError, zipfile.BadZipFile, json.JSONDecodeError)


def outputs_digest(out: Outputs) -> str:
    """sha256 of every tensor of a split's outputs (the feature cache's flat names)."""
    return tensor_digest(flat_tensors(out))


def fit_data_identity(data: FitData, model_fingerprint: str, feature_key: object = None) -> dict:
    """What identifies the fit data in a key: content digests, the model, and (for the reader) the
    fit split's feature-cache key."""
    return {"model": model_fingerprint, "feature_cache_key": feature_key,
            "train": None if data.train is None else {"n": len(data.train), "sha256": outputs_digest(data.train)},
            "val_inputs": None if data.val_inputs is None else
            {"shape": list(data.val_inputs.shape), "sha256": tensor_digest({"x": data.val_inputs})}}


def _module_file(name: str) -> Path | None:
    """The source file of an ``ood_lightning`` module (None: not one, or not a file here)."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    parts = name.split(".")[1:]
    candidates = [_PACKAGE_ROOT / Path(*parts).with_suffix(".py")] if parts else []
    for candidate in (*candidates, _PACKAGE_ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """The ``ood_lightning`` modules a source file imports, anywhere in it (function-level imports too)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # ``from pkg import submodule``
    return {m for m in found if _module_file(m) is not None}


@cache
def _closure(roots: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(module, sha256 of its source) for ``roots`` and every ``ood_lightning`` module they import."""
    seen: dict[str, str] = {}
    todo = [m for m in roots if _module_file(m) is not None]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        source = path.read_bytes()
        seen[name] = hashlib.sha256(source).hexdigest()
        todo.extend(_imports(path, name) - seen.keys())
    return tuple(sorted(seen.items()))


def _defining_module(target: str) -> str:
    """The module that defines what a ``_target_`` names (``ood_lightning.detectors.LSGM`` ->
    ``ood_lightning.detectors.lsgm``, not the re-exporting package); the name itself if unresolvable."""
    try:
        return importlib.import_module(target).__name__
    except ImportError:
        pass
    module, _, attr = target.rpartition(".")
    try:
        return getattr(getattr(importlib.import_module(module), attr), "__module__", None) or module
    except (ImportError, AttributeError, ValueError):
        return target


def _targets(config: object) -> set[str]:
    """The defining modules of every ``_target_`` anywhere in a config."""
    out: set[str] = set()
    if isinstance(config, dict):
        for k, v in config.items():
            if k == "_target_" and isinstance(v, str):
                out.add(_defining_module(v))
            else:
                out |= _targets(v)
    elif isinstance(config, list):
        for v in config:
            out |= _targets(v)
    return out


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def code_identity(scorer: Scorer, config: object = None) -> dict:
    """The scorer's code: source digests of its class's modules and their ``ood_lightning`` imports
    (and of ``_target_`` modules of its config), and the numeric libraries' versions."""
    roots = {c.__module__ for c in type(scorer).__mro__} | _targets(config)
    modules = _closure(tuple(sorted(roots)))
    combined = hashlib.sha256("".join(f"{m}={h};" for m, h in modules).encode()).hexdigest()
    return {"class": f"{type(scorer).__module__}.{type(scorer).__qualname__}", "sources": combined,
            "modules": [m for m, _ in modules], "python": sys.version.split()[0],
            "libraries": {d: _version(d) for d in ("torch", "numpy", "scikit-learn", "nflows")}}


def fit_key(name: str, scorer: Scorer, config: object, data_identity: dict) -> tuple[str, dict]:
    """(sha256 key, its ingredients) of one scorer's fit."""
    ingredients = {"format": FORMAT, "name": name, "config": config, "fit_data": data_identity,
                   "code": code_identity(scorer, config)}
    blob = json.dumps(ingredients, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest(), ingredients


def _split_state(state: dict[str, StateValue]) -> tuple[dict[str, Tensor], str]:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, Tensor)}
    values = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
    return tensors, json.dumps(values, allow_nan=True)


class FitCache:
    """Fitted scorers under ``root`` (one root per checkpoint, beside its feature cache)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, name: str, key: str) -> Path:
        return self.root / f"{slug(name)}-{key[:SHORT]}.pt"

    def load(self, name: str, key: str, scorer: Scorer) -> bool:
        """Restore ``scorer`` from the entry of ``key``: True on a hit; False when there is none, or when
        the entry is damaged (then it is removed, with a warning, and the caller refits)."""
        path = self.path(name, key)
        if not path.exists():
            return False
        before = dict(scorer.__dict__)
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(entry, dict) or entry.get("format") != FORMAT:
                raise ValueError(f"not a format-{FORMAT} fit cache entry")
            if entry.get("key") != key:
                raise ValueError(f"it holds key {str(entry.get('key'))[:SHORT]}, not {key[:SHORT]}")
            tensors, values = entry["tensors"], json.loads(entry["values"])
            if not (isinstance(tensors, dict) and all(isinstance(t, Tensor) for t in tensors.values())
                    and isinstance(values, dict)):
                raise ValueError("malformed state")
            scorer.load_fit_state({**values, **tensors})
        except _CORRUPT as err:
            scorer.__dict__.clear()
            scorer.__dict__.update(before)  # nothing half-restored survives
            log.warning("fit cache entry %s is corrupt (%s); removing it and fitting %s again", path,
                        str(err).splitlines()[0] if str(err) else type(err).__name__, name)
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
            return False
        return True

    def store(self, name: str, key: str, scorer: Scorer, ingredients: dict | None = None) -> Path:
        """Write the fitted ``scorer``'s state atomically (the readable ``.json`` after it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tensors, values = _split_state(scorer.fit_state())
        path = self.path(name, key)
        atomic_write(path, lambda tmp: torch.save({"format": FORMAT, "key": key, "tensors": tensors,
                                                   "values": values}, tmp))
        if ingredients is not None:
            atomic_write_text(path.with_suffix(".json"), json.dumps({"key": key, **ingredients}, indent=2,
                                                                    sort_keys=True, default=repr))
        return path
