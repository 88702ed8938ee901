"""``data=fashionmnist`` from the Debian package's files (read where they are) and the idx reader."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from ood_lightning.core.errors import CorruptDataError, DatasetNotFoundError
from ood_lightning.data import registry
from ood_lightning.data.idx import read_idx
from ood_lightning.data.registry import FASHION_MNIST_PACKAGE, load_dataset

needs_package = pytest.mark.skipif(
    not (FASHION_MNIST_PACKAGE / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed ({FASHION_MNIST_PACKAGE} is missing): `apt-get install dataset-fashion-mnist`")


def _idx_gz(path, array: np.ndarray) -> None:
    """An idx file of uint8 ``array`` (the format's header by hand), gzip-compressed."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@needs_package
@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_package_reads_like_torchvision_reads_the_decompressed_files(tmp_path, split, n):
    """Independent truth: torchvision's own idx reader on the decompressed copies of the same files."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    prefix = "train" if split == "train" else "t10k"
    copies = []
    for kind in ("images-idx3", "labels-idx1"):
        out = tmp_path / f"{prefix}-{kind}-ubyte"
        out.write_bytes(gzip.decompress((FASHION_MNIST_PACKAGE / f"{out.name}.gz").read_bytes()))
        copies.append(out)
    data = load_dataset("fashionmnist", split, root=tmp_path / "no_torchvision_layout")
    assert data.images.shape == (n, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], read_image_file(str(copies[0])))
    assert torch.equal(data.labels, read_label_file(str(copies[1])).long())
    assert data.labels.bincount().tolist() == [n // 10] * 10
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"


@needs_package
def test_package_training_set_has_the_published_statistics():
    """Fashion-MNIST's published normalisation constants (mean 0.2860, std 0.3530 of the training pixels;
    conf/data/fashionmnist.yaml): the package ships the original data (Debian re-compressed the
    .gz files, so their MD5s differ from the published ones; the decompressed contents do not)."""
    pixels = load_dataset("fashionmnist", "train", root="/nonexistent").images.double() / 255
    assert abs(float(pixels.mean()) - 0.2860) < 5e-5 and abs(float(pixels.std()) - 0.3530) < 5e-5


def test_missing_package_is_one_line_naming_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "FASHION_MNIST_PACKAGE", tmp_path / "absent")
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashionmnist", "test", root=tmp_path)
    text = str(err.value)
    assert "\n" not in text and "apt-get install dataset-fashion-mnist" in text and str(tmp_path / "absent") in text


def test_idx_reader_round_trips_and_refuses_damaged_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    monkeypatch.setattr(registry, "FASHION_MNIST_PACKAGE", tmp_path)
    _idx_gz(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    data = load_dataset("fashionmnist", "test", root=tmp_path / "elsewhere")
    assert np.array_equal(data.images[:, 0].numpy(), images) and np.array_equal(data.labels.numpy(), labels)
    # truncated body, bad header, broken gzip: each a CorruptDataError naming the file
    good = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    for name, raw in [("short.gz", gzip.compress(good[:-5])), ("magic.gz", gzip.compress(b"\x01" + good[1:])),
                      ("stream.gz", (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()[:-40])]:
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(CorruptDataError, match=name):
            read_idx(tmp_path / name)
    # labels that do not match the images
    _idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:5])
    with pytest.raises(CorruptDataError, match="do not match"):
        load_dataset("fashionmnist", "test", root=tmp_path / "elsewhere")


def test_idx_reader_keeps_wider_types_big_endian_correct(tmp_path):
    values = np.array([[1, -2], [70000, -70000]], dtype=">i4")
    header = bytes([0, 0, 0x0C, 2]) + (2).to_bytes(4, "big") * 2
    (tmp_path / "x-idx2-int").write_bytes(header + values.tobytes())
    assert read_idx(tmp_path / "x-idx2-int").tolist() == [[1, -2], [70000, -70000]]
