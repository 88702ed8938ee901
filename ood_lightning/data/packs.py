"""Offline dataset packs (``*.npz`` of concatenated JPEGs, see ``shared/data/README.md``).

A pack is decoded once into a uint8 array [N, C, H, W] and cached as ``.npy`` next to
nothing the user owns (``cache_dir``), keyed by the pack's name, size and mtime, so no
JPEG is ever decoded per sample per epoch. Later processes read the cache (~0.1 s for CIFAR-10).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pack:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]; -1 for OOD sets without classes
    classes: tuple[str, ...]


def _decode(jpeg: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Decode every JPEG of a pack into one uint8 array (N, C, H, W)."""
    from rich.progress import track

    first = np.asarray(Image.open(io.BytesIO(jpeg[offsets[0] : offsets[1]].tobytes())))
    n = len(offsets) - 1
    out = np.empty((n, *first.shape), dtype=np.uint8)
    for i in track(range(n), description="decoding pack", transient=True, disable=n < 5000):
        out[i] = np.asarray(Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())))
    return out[:, None] if out.ndim == 3 else out.transpose(0, 3, 1, 2).copy()


@lru_cache(maxsize=8)
def load_pack(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Pack:
    """Read a pack, decoding its JPEGs only the first time (per cache directory)."""
    path = Path(path)
    data = np.load(path, allow_pickle=False)
    labels = data["labels"].astype(np.int64)
    classes = tuple(str(c) for c in data["classes"])
    cache = None
    if cache_dir is not None:
        st = path.stat()
        cache = Path(cache_dir) / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}.npy"
        if cache.exists():
            images = np.load(cache)
            if len(images) == len(labels):
                return Pack(images, labels, classes)
    log.info("decoding %s (once; cached in %s)", path.name, cache_dir)
    images = _decode(data["jpeg"], data["offsets"])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, images)
        os.replace(tmp, cache)  # atomic: parallel runs never read a half-written cache
    return Pack(images, labels, classes)
