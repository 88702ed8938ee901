"""A disk cache of one forward pass per (dataset, split, transform), so ten detectors on one
backbone, and every re-run of them, cost one pass over the data.

Entries are addressed by readable names, ``root/<dataset>/<split>/<transform>/``, holding
``outputs.pt`` (logits, features, labels, pooled layers) and ``manifest.json``. The manifest
records which backbone made the features (a hash of its weights); asking for an entry with a
different backbone is an error, never a silent miss or a silent reuse, because stale
features give plausible but wrong numbers. Both files are written atomically
(:mod:`ood_lightning.core.io`), the manifest last, so an interrupted write leaves no entry at all;
an entry that is damaged anyway (a truncated or foreign file, tensors that disagree with the
manifest) is logged with its path and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ood_lightning.core.errors import CheckpointMismatchError, ConfigError
from ood_lightning.core.io import atomic_write, atomic_write_text
from ood_lightning.core.progress import Progress
from ood_lightning.scoring.api import Outputs
from ood_lightning.scoring.passes import extract

log = logging.getLogger(__name__)

OUTPUTS_FILE = "outputs.pt"
MANIFEST_FILE = "manifest.json"
#: hex digits kept of the sha256 (64 bits: collisions are not a practical concern)
HASH_CHARS = 16


def tensor_digest(values: Mapping[str, object]) -> str:
    """sha256 (hex) of named values in sorted name order: a tensor by its dtype, shape and raw bytes,
    anything else (a module's extra state, a missing tensor) by its ``repr``."""
    digest = hashlib.sha256()
    for key in sorted(values):
        value = values[key]
        digest.update(key.encode())
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's state_dict (:func:`tensor_digest`), truncated.

    Any changed weight or buffer changes it; moving the model between devices does not.
    """
    return tensor_digest(model.state_dict())[:HASH_CHARS]


def slug(part: str) -> str:
    """A path component that reads like ``part`` but cannot escape the cache root."""
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", str(part)).strip("._") or "_"


#: what a damaged entry raises when read: truncated zip, foreign bytes, bad JSON, missing keys
_CORRUPT = (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError,
            zipfile.BadZipFile)


_MANIFEST_KEYS = {"backbone", "dataset", "split", "transform", "shapes"}


class _CorruptEntry(Exception):
    pass


def _to_dict(out: Outputs) -> dict:
    # ``features`` is usually ``layers["penultimate"]``; torch.save keeps shared storage once.
    return {"logits": out.logits, "features": out.features, "labels": out.labels, "layers": dict(out.layers),
            "extra": dict(out.extra)}


def flat_tensors(out: Outputs) -> dict[str, Tensor]:
    """Every stored tensor by a flat name (the manifest's ``shapes``)."""
    return {"logits": out.logits, "features": out.features,
            **({"labels": out.labels} if out.labels is not None else {}),
            **{f"layers/{k}": v for k, v in out.layers.items()}, **{f"extra/{k}": v for k, v in out.extra.items()}}


class FeatureCache:
    """Feature cache under ``root``; use one root per backbone (the manifest enforces it)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, dataset: str, split: str, transform: str) -> Path:
        """The entry's folder: ``root/<dataset>/<split>/<transform>``."""
        return self.root / slug(dataset) / slug(split) / slug(transform)

    def load(self, fingerprint: str, dataset: str, split: str, transform: str) -> Outputs | None:
        """The cached outputs, ``None`` if absent; raises if they were made by another backbone."""
        entry = self.path(dataset, split, transform)
        manifest_path = entry / MANIFEST_FILE
        if not manifest_path.exists() or not (entry / OUTPUTS_FILE).exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            missing = _MANIFEST_KEYS - set(manifest if isinstance(manifest, dict) else ())
            if missing:
                raise ValueError(f"no {sorted(missing)}")
        except _CORRUPT as err:
            return self._discard(entry, f"unreadable {MANIFEST_FILE}: {err}")
        if manifest["backbone"] != fingerprint:
            raise CheckpointMismatchError(
                f"feature cache at {entry} was made with backbone {manifest['backbone']}, this model is "
                f"{fingerprint}; delete it or pass a different feature cache root for this backbone")
        stored = (manifest["dataset"], manifest["split"], manifest["transform"])
        if stored != (dataset, split, transform):
            raise ConfigError(f"feature cache at {entry} holds dataset/split/transform {stored}, not "
                              f"{(dataset, split, transform)}: names that differ only in punctuation share a folder")
        try:
            return self._read_outputs(entry, manifest)
        except (_CorruptEntry, *_CORRUPT) as err:
            return self._discard(entry, f"{OUTPUTS_FILE}: {err}".splitlines()[0])

    @staticmethod
    def _read_outputs(entry: Path, manifest: dict) -> Outputs:
        data = torch.load(entry / OUTPUTS_FILE, map_location="cpu", weights_only=True)
        out = Outputs(logits=data["logits"], features=data["features"], layers=dict(data["layers"]),
                      labels=data["labels"], extra=dict(data.get("extra") or {}))
        shapes = {k: list(v.shape) for k, v in flat_tensors(out).items()}
        if shapes != manifest.get("shapes"):
            raise _CorruptEntry(f"tensor shapes {shapes} differ from the manifest's {manifest.get('shapes')}")
        return out

    @staticmethod
    def _discard(entry: Path, reason: str) -> None:
        """Remove a damaged entry (it is rebuilt by the caller's forward pass) and say so."""
        log.warning("feature cache entry %s is corrupt (%s); removing it and extracting the features again",
                    entry, reason)
        shutil.rmtree(entry, ignore_errors=True)
        return None

    def store(self, out: Outputs, fingerprint: str, dataset: str, split: str, transform: str, name: str = "") -> Path:
        """Write an entry (outputs first, manifest last) and return its folder."""
        entry = self.path(dataset, split, transform)
        entry.mkdir(parents=True, exist_ok=True)
        tensors = flat_tensors(out)
        manifest = {
            "backbone": fingerprint, "name": name, "dataset": dataset, "split": split, "transform": transform,
            "dtype": str(out.features.dtype).removeprefix("torch."), "n": len(out),
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write(entry / OUTPUTS_FILE, lambda p: torch.save(_to_dict(out), p))
        atomic_write_text(entry / MANIFEST_FILE, json.dumps(manifest, indent=2))
        return entry

    def get_or_extract(self, model: nn.Module, name: str, loader: DataLoader, preprocess: Callable[[Tensor], Tensor],
                       device: torch.device | str, dataset: str, split: str, transform: str,
                       extract_fn: Callable[..., Outputs] = extract, progress: Progress | None = None,
                       fingerprint: str | None = None) -> Outputs:
        """Outputs of ``model`` on ``loader`` from disk, or from one ``extract_fn`` pass that is then stored.

        ``name`` labels the set (progress bar, manifest); ``transform`` must name everything
        about the inputs that the dataset and split do not (preprocessing, resize/crop, subset
        size). ``extract_fn`` has :func:`~ood_lightning.scoring.passes.extract`'s signature;
        pass ``fingerprint`` to reuse a :func:`model_fingerprint` already computed.
        """
        fingerprint = fingerprint or model_fingerprint(model)
        cached = self.load(fingerprint, dataset, split, transform)
        if cached is not None:
            return cached
        out = extract_fn(model, loader, preprocess, torch.device(device), progress=progress,
                         description=f"features: {name}")
        self.store(out, fingerprint, dataset, split, transform, name)
        return out
