"""Offline dataset packs (``*.npz`` of concatenated JPEGs, see ``shared/data/README.md``).

A pack is decoded once into a uint8 array [N, C, H, W] and cached as ``.npy`` next to
nothing the user owns (``cache_dir``), keyed by a SHA-256 of the pack's bytes, so no JPEG is
ever decoded per sample per epoch and no two different files ever share decoded pixels (a copy
with altered images keeps the size and mtime under ``cp -p``, ``rsync -a``, tar or zip). The
hash is computed once per file and remembered under ``cache_dir/digests`` by path, size, mtime,
ctime and inode (ctime changes on every write, and no tool sets it back). Later processes read the
cache (~0.1 s for CIFAR-10).

A pack that cannot be read whole (truncated copy, bad CRC) is a :class:`CorruptDataError`
naming the file and the checksum check; a damaged cache file is logged and decoded again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ood_lightning.core.errors import CorruptDataError
from ood_lightning.core.io import atomic_write, atomic_write_text
from ood_lightning.core.progress import stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pack:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]; -1 for OOD sets without classes
    classes: tuple[str, ...]


def _decode(jpeg: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Decode every JPEG of a pack into one uint8 array (N, C, H, W)."""
    first = np.asarray(Image.open(io.BytesIO(jpeg[offsets[0] : offsets[1]].tobytes())))
    n = len(offsets) - 1
    out = np.empty((n, *first.shape), dtype=np.uint8)
    with stage("decoding pack", n, "images", quiet_under=5.0) as decoding:
        for i in range(n):
            out[i] = np.asarray(Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())))
            decoding.advance()
    return out[:, None] if out.ndim == 3 else out.transpose(0, 3, 1, 2).copy()


#: what reading a damaged .npz / .npy raises (zip without a directory, bad CRC, short data, bad JPEG)
_UNREADABLE = (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError)


def _read_cache(cache: Path, n: int) -> np.ndarray | None:
    """The decoded images from ``cache``, or ``None`` (logged) when the file is damaged or not this pack's."""
    try:
        images = np.load(cache, allow_pickle=False)
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != n:
            raise ValueError(f"holds {images.dtype} {images.shape}, not uint8 [{n}, C, H, W]")
    except _UNREADABLE as err:
        log.warning("decoded-pack cache %s is corrupt (%s); decoding the pack again", cache, err)
        return None
    return images


def content_digest(path: Path, cache_dir: str | os.PathLike) -> str:
    """SHA-256 of the file at ``path``, remembered in ``cache_dir/digests`` for this exact file
    (path, size, mtime, ctime, inode): any write to it, or another file at that path, hashes again."""
    st = path.stat()
    identity = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    memo = Path(cache_dir) / "digests" / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.txt"
    try:
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    digest = sha.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(memo, digest)
    return digest


@lru_cache(maxsize=8)
def load_pack(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Pack:
    """Read a pack, decoding its JPEGs only the first time (per cache directory)."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        labels = data["labels"].astype(np.int64)
        classes = tuple(str(c) for c in data["classes"])
    except _UNREADABLE as err:
        raise CorruptDataError.of(path, f"{type(err).__name__}: {err}") from None
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"{path.stem}-{content_digest(path, cache_dir)[:20]}.npy"
        if cache.exists():
            images = _read_cache(cache, len(labels))
            if images is not None:
                return Pack(images, labels, classes)
    log.info("decoding %s (once; cached in %s)", path.name, cache_dir)
    try:
        images = _decode(data["jpeg"], data["offsets"])
    except _UNREADABLE as err:
        raise CorruptDataError.of(path, f"{type(err).__name__}: {err}") from None
    if len(images) != len(labels):
        raise CorruptDataError.of(path, f"{len(images)} images but {len(labels)} labels")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda tmp: np.save(tmp, images))  # parallel runs never read a half-written cache
    return Pack(images, labels, classes)
