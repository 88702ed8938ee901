"""A disk cache of one forward pass per (dataset, split, transform), so ten detectors on one
backbone, and every re-run of them, cost one pass over the data.

Entries are addressed by readable names, ``root/<dataset>/<split>/<transform>/``, holding
``outputs.pt`` (logits, features, labels, pooled layers) and ``manifest.json``. The manifest
records which backbone made the features (a hash of its weights); asking for an entry with a
different backbone is an error, never a silent miss or a silent reuse, because stale
features give plausible but wrong numbers. Both files are written atomically (temporary
file + ``os.replace``), the manifest last, so an interrupted write leaves no entry at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.progress import Progress
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ood_lightning.errors import CheckpointMismatchError, ConfigError
from ood_lightning.scoring.api import Outputs
from ood_lightning.scoring.passes import extract

OUTPUTS_FILE = "outputs.pt"
MANIFEST_FILE = "manifest.json"
#: hex digits kept of the sha256 (64 bits: collisions are not a practical concern)
HASH_CHARS = 16


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's state_dict (names, dtypes, shapes and raw bytes, in sorted key order), truncated.

    Any changed weight or buffer changes it; moving the model between devices does not.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        value = state[key]
        digest.update(key.encode())
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        else:  # e.g. a module's extra state
            digest.update(repr(value).encode())
    return digest.hexdigest()[:HASH_CHARS]


def _slug(part: str) -> str:
    """A path component that reads like ``part`` but cannot escape the cache root."""
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", str(part)).strip("._") or "_"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _to_dict(out: Outputs) -> dict:
    # ``features`` is usually ``layers["penultimate"]``; torch.save keeps shared storage once.
    return {"logits": out.logits, "features": out.features, "labels": out.labels, "layers": dict(out.layers)}


class FeatureCache:
    """Feature cache under ``root``; use one root per backbone (the manifest enforces it)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, dataset: str, split: str, transform: str) -> Path:
        """The entry's folder: ``root/<dataset>/<split>/<transform>``."""
        return self.root / _slug(dataset) / _slug(split) / _slug(transform)

    def load(self, fingerprint: str, dataset: str, split: str, transform: str) -> Outputs | None:
        """The cached outputs, ``None`` if absent; raises if they were made by another backbone."""
        entry = self.path(dataset, split, transform)
        manifest_path = entry / MANIFEST_FILE
        if not manifest_path.exists() or not (entry / OUTPUTS_FILE).exists():
            return None
        manifest = json.loads(manifest_path.read_text())
        if manifest["backbone"] != fingerprint:
            raise CheckpointMismatchError(
                f"feature cache at {entry} was made with backbone {manifest['backbone']}, this model is "
                f"{fingerprint}; delete it or pass a different feature cache root for this backbone")
        stored = (manifest["dataset"], manifest["split"], manifest["transform"])
        if stored != (dataset, split, transform):
            raise ConfigError(f"feature cache at {entry} holds dataset/split/transform {stored}, not "
                              f"{(dataset, split, transform)}: names that differ only in punctuation share a folder")
        data = torch.load(entry / OUTPUTS_FILE, map_location="cpu", weights_only=True)
        return Outputs(logits=data["logits"], features=data["features"], layers=data["layers"], labels=data["labels"])

    def store(self, out: Outputs, fingerprint: str, dataset: str, split: str, transform: str, name: str = "") -> Path:
        """Write an entry (outputs first, manifest last) and return its folder."""
        entry = self.path(dataset, split, transform)
        entry.mkdir(parents=True, exist_ok=True)
        tensors = {"logits": out.logits, "features": out.features,
                   **({"labels": out.labels} if out.labels is not None else {}),
                   **{f"layers/{k}": v for k, v in out.layers.items()}}
        manifest = {
            "backbone": fingerprint, "name": name, "dataset": dataset, "split": split, "transform": transform,
            "dtype": str(out.features.dtype).removeprefix("torch."), "n": len(out),
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _atomic_write(entry / OUTPUTS_FILE, lambda p: torch.save(_to_dict(out), p))
        _atomic_write(entry / MANIFEST_FILE, lambda p: p.write_text(json.dumps(manifest, indent=2)))
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
