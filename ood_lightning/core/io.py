"""Atomic file writes: write a temporary file beside the target, flush it to disk, rename it.

A reader (aggregation, a parallel run sharing a cache) then sees the old file or the new one,
never a part, whatever kills the writer, and a full disk leaves the old file as it was (and one
line, :class:`~ood_lightning.core.errors.DiskFullError`, naming the folder and the space needed). The temporary name keeps the target's suffix, because
``np.save`` / ``np.savez`` append theirs to a path without it.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from ood_lightning.core.errors import DiskFullError

#: what a write to a full disk (or an exhausted quota) fails with
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], object], size: int | None = None) -> Path:
    """Call ``writer(tmp)`` to write the whole file at ``tmp``, then move it to ``path`` in one step.
    ``size``: the bytes it writes, if known (for the disk-full message)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        writer(tmp)
        with open(tmp, "rb") as f:  # the bytes reach the disk before the name does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        needed = size if size is not None else (tmp.stat().st_size if tmp.exists() else 0)
        raise DiskFullError.of(path, needed, at_least=size is None) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """``Path.write_bytes``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), size=len(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
