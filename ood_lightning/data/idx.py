"""Reading MNIST-style idx files (plain or gzip-compressed) into arrays, checked against their header.

The Debian package ``dataset-fashion-mnist`` ships Fashion-MNIST as the four original
``*-idx*-ubyte.gz`` files; reading them where they are needs no copy and no torchvision layout.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ood_lightning.core.errors import CorruptDataError

#: idx type byte -> numpy dtype (big-endian, as the format stores it)
_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """The array an idx file holds (shape from its header); ``.gz`` files are decompressed in memory.

    Header: magic ``0 0 <type> <ndim>`` then ``ndim`` big-endian uint32 sizes; the body must hold
    exactly the product of the sizes in items of that type (else :class:`CorruptDataError`).
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # bad gzip stream, truncated archive
        raise CorruptDataError.of(path, f"cannot decompress: {err}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _TYPES:
        raise CorruptDataError.of(path, f"not an idx file: header {raw[:4].hex() or 'empty'}")
    ndim = raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise CorruptDataError.of(path, f"truncated inside the header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_TYPES[raw[2]])
    expected = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise CorruptDataError.of(path, f"{'truncated' if len(raw) < expected else 'too long'}: "
                                        f"{len(raw)} of {expected} bytes (decompressed)")
    return np.frombuffer(raw, dtype=dtype, offset=start).reshape(shape).astype(dtype.newbyteorder("="))
