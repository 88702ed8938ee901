"""Tiny data files in the real on-disk formats (an offline ``.npz`` pack, MNIST's raw idx
files), so tests can copy, invert, truncate or corrupt them in ``tmp_path``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def write_pack(path: Path, images: np.ndarray, labels: np.ndarray, classes=("a", "b"), fmt: str = "jpeg") -> list[bytes]:
    """An offline pack: ``images`` uint8 [N, H, W, 3] as concatenated ``fmt`` files (``jpeg`` or the
    lossless ``png``) under the key ``fmt``, as in shared/data; returns the files' bytes."""
    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
        blobs.append(buf.getvalue())
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    np.savez(path, **{fmt: np.frombuffer(b"".join(blobs), dtype=np.uint8)}, offsets=offsets, labels=labels,
             classes=np.array(list(classes)))
    return blobs


def _idx(array: np.ndarray) -> bytes:
    """The idx format: magic 0x0000 08 <ndim>, big-endian uint32 sizes, then the uint8 bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist_raw(root: Path, n_train: int = 120, n_test: int = 60, seed: int = 0,
                    invert_test: bool = False) -> Path:
    """``root/MNIST/raw`` with learnable 28x28 digits-like images of 10 classes (a bright square
    whose position is the class); ``invert_test`` stores 255 - x for the test images."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 5)
            images[i, 4 + 10 * r: 12 + 10 * r, 2 + 5 * col: 6 + 5 * col] = 230
        if split == "test" and invert_test:
            images = 255 - images
        img_name, lab_name = MNIST_FILES[split]
        (raw / img_name).write_bytes(_idx(images))
        (raw / lab_name).write_bytes(_idx(labels.astype(np.uint8)))
    return raw
