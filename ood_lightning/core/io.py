"""Atomic file writes: write a temporary file beside the target, flush it to disk, rename it.

A reader (aggregation, a parallel run sharing a cache) then sees the old file or the new one,
never a part, whatever kills the writer. The temporary name keeps the target's suffix, because
``np.save`` / ``np.savez`` append theirs to a path without it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp)`` to write the whole file at ``tmp``, then move it to ``path`` in one step."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        writer(tmp)
        with open(tmp, "rb") as f:  # the bytes reach the disk before the name does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
