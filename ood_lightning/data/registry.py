"""Datasets by name, all materialised as in-memory tensors.

Every loader returns :class:`ArrayData` (uint8 images [N, C, H, W] or float features,
int64 labels), so that batching, augmentation and normalisation happen on whole batches
(on the GPU when there is one) and no image is decoded per sample per epoch.

Sources, tried in order for the named sets: an offline pack in ``root``
(``shared/data``), then torchvision's layout in ``root`` (with ``download=True`` for a
user who is online). Image-folder OOD sets (Textures, LSUN, iSUN, Places365) are read
with ``torchvision.datasets.ImageFolder`` and resized to the ID image size once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError, CorruptDataError, DatasetNotFoundError
from ood_lightning.core.roots import shared_root
from ood_lightning.data import synthetic
from ood_lightning.data.idx import read_idx
from ood_lightning.data.packs import load_pack

log = logging.getLogger(__name__)


@dataclass
class ArrayData:
    """A whole split in memory: ``images`` uint8 [N,C,H,W] (or float), ``labels`` int64 [N]."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> ArrayData:
        return ArrayData(self.images[index], self.labels[index], self.classes)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])


def _missing(name: str, looked: list[Path], online_hint: bool = True) -> DatasetNotFoundError:
    where = ", ".join(str(p) for p in looked)
    hint = "pass data.root=/path/to/folder (or set OOD_LIGHTNING_DATA)"
    if online_hint:
        hint += ", or data.download=true when online"
    return DatasetNotFoundError(f"dataset {name!r} not found: looked for {where}; {hint}")


def _from_pack(path: Path, cache_dir) -> ArrayData:
    pack = load_pack(str(path), None if cache_dir is None else str(cache_dir))
    return ArrayData(torch.from_numpy(pack.images), torch.from_numpy(pack.labels), pack.classes)


def _torchvision(name: str, cls_name: str, root: Path, split: str, download: bool, looked_for: str) -> ArrayData:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    kwargs = {"split": split} if cls_name == "SVHN" else {"train": split == "train"}
    try:
        ds = cls(root=str(root), download=download, **kwargs)
    except (RuntimeError, FileNotFoundError, ValueError, EOFError) as err:
        if download:
            raise DatasetNotFoundError(f"downloading {name!r} into {root} failed ({err}); check the connection or pass data.root") from err
        damaged = _damaged_idx_file(root / looked_for)
        if damaged is not None:
            raise CorruptDataError.of(*damaged) from None
        if not isinstance(err, FileNotFoundError) and "not found" not in str(err).lower():
            raise CorruptDataError.of(root / looked_for, f"{type(err).__name__}: {err}".splitlines()[0]) from None
        raise _missing(name, [root / looked_for]) from None
    data = torch.as_tensor(np.asarray(ds.data))
    if data.ndim == 3:  # grey [N, H, W]
        data = data[:, None]
    elif data.shape[-1] == 3:  # [N, H, W, 3]
        data = data.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(getattr(ds, "targets", getattr(ds, "labels", None))), dtype=torch.int64)
    return ArrayData(data.contiguous(), labels, tuple(getattr(ds, "classes", ())))


def _damaged_idx_file(folder: Path) -> tuple[Path, str] | None:
    """The first idx file (MNIST's raw format) in ``folder`` whose size disagrees with its header, and why.

    The header is the magic ``0 0 <type> <ndim>`` and ``ndim`` big-endian uint32 sizes; a whole
    file holds exactly the product of the sizes in items of that type after it.
    """
    itemsize = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}
    for path in sorted(folder.glob("*-idx*-ubyte")) if folder.is_dir() else ():
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in itemsize:
                return path, f"not an idx file: header {head.hex() or 'empty'}"
            dims = f.read(4 * head[3])
        if len(dims) < 4 * head[3]:
            return path, f"truncated inside the header ({size} bytes)"
        n = int(np.prod([int.from_bytes(dims[i: i + 4], "big") for i in range(0, len(dims), 4)], dtype=np.int64))
        expected = 4 + len(dims) + n * itemsize[head[2]]
        if size != expected:
            return path, f"{'truncated' if size < expected else 'too long'}: {size} of {expected} bytes"
    return None


def _packed_or_torchvision(name: str, pack_stem: str, cls_name: str, tv_folder: str):
    def load(root: Path, split: str, download: bool, cache_dir=None, **_) -> ArrayData:
        pack = root / f"{pack_stem}-{split}.npz"
        if pack.exists():
            return _from_pack(pack, cache_dir)
        try:
            return _torchvision(name, cls_name, root, split, download, tv_folder)
        except CorruptDataError:
            raise
        except DatasetNotFoundError as err:
            if download:
                raise
            raise _missing(name, [pack, root / tv_folder]) from err

    return load


def _torchvision_only(name: str, cls_name: str, tv_folder: str):
    def load(root: Path, split: str, download: bool, **_) -> ArrayData:
        return _torchvision(name, cls_name, root, split, download, tv_folder)

    return load


#: where the Debian package ``dataset-fashion-mnist`` installs the four original ``*-ubyte.gz`` files
FASHION_MNIST_PACKAGE = Path("/usr/share/datasets/fashion-mnist")

#: Fashion-MNIST's class names in label order (the dataset's own list; torchvision uses the same)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def _fashion_mnist(root: Path, split: str, download: bool, **_) -> ArrayData:
    """torchvision's layout under ``root`` (``FashionMNIST/raw``) where it is there or ``download`` is on,
    else the Debian package's files, read where they are (no copy)."""
    tv_folder = root / "FashionMNIST" / "raw"
    if download or tv_folder.is_dir():
        return _torchvision("fashionmnist", "FashionMNIST", root, split, download, "FashionMNIST/raw")
    prefix = "train" if split == "train" else "t10k"
    images, labels = (FASHION_MNIST_PACKAGE / f"{prefix}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1"))
    if not (images.is_file() and labels.is_file()):
        raise DatasetNotFoundError(
            f"dataset 'fashionmnist' not found: looked for {tv_folder} and {FASHION_MNIST_PACKAGE}; install it with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass data.root=/folder/with/FashionMNIST/raw, "
            "or data.download=true when online")
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise CorruptDataError.of(images, f"images {x.shape} do not match labels {y.shape} of {labels.name}")
    return ArrayData(torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64)), FASHION_MNIST_CLASSES)


def _ood_pack(name: str, stem: str):
    def load(root: Path, cache_dir=None, **_) -> ArrayData:
        path = root / f"{stem}.npz"
        if not path.exists():
            raise _missing(name, [path], online_hint=False)
        return _from_pack(path, cache_dir)

    return load


def _image_folder(name: str, folder: str):
    def load(root: Path, image_size: int = 32, path: str | None = None, **_) -> ArrayData:
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        where = Path(path) if path else root / folder
        if not where.is_dir():
            raise _missing(name, [where], online_hint=False)
        tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.PILToTensor()])
        try:
            ds = ImageFolder(str(where), transform=tf)
        except FileNotFoundError as err:
            raise DatasetNotFoundError(f"dataset {name!r}: {where} holds no images in class sub-folders ({err})") from None
        images = torch.stack([ds[i][0].expand(3, -1, -1) for i in range(len(ds))])
        return ArrayData(images, torch.full((len(ds),), -1, dtype=torch.int64))

    return load


def _synthetic(name: str):
    def load(split: str = "test", n: int = 1000, shape=None, seed: int = 0, root=None, download=None,
             cache_dir=None, image_size=None, **kwargs) -> ArrayData:
        fn = synthetic.SYNTHETIC[name]
        # train and test draws of toy sets must differ: offset the seed by split
        seed = int(seed) + {"train": 0, "val": 0, "test": 10_007}.get(split, 0)
        if shape is not None and name.endswith(("noise", "blobs")):
            kwargs["shape"] = tuple(shape)
        x, y = fn(int(n), seed=seed, **kwargs)
        return ArrayData(x, y)

    return load


# A registered dataset plus i.i.d. uniform noise per pixel: VMDLS's "MNIST-noise" OOD set.
#
# VMDLS (and its code) builds MNIST-noise by adding U[0, 1) noise to MNIST test digits *after*
# normalising them with mean 0.5 / std 0.5, i.e. U[0, 0.5) in [0, 1] pixel units, without
# clipping. Sums above 1 cannot be stored as uint8, so the images are returned as float in
# [0, 1 + amplitude] pixel units, which :class:`~ood_lightning.data.transforms.Preprocess`
# normalises like any float input (no division by 255).
def additive_noise(root: Path, split: str = "test", base: str = "mnist", amplitude: float = 0.5, seed: int = 0,
                   download: bool = False, cache_dir=None, **_):
    """``base``'s ``split`` as float pixels in [0, 1] plus ``amplitude`` * U[0, 1), seeded."""
    data = load_dataset(base, split=split, root=root, download=download, cache_dir=cache_dir)
    if data.images.dtype != torch.uint8:
        raise ValueError(f"additive_noise needs a uint8 image set as base, {base!r} has {data.images.dtype}")
    gen = torch.Generator().manual_seed(int(seed))
    x = data.images.float() / 255.0
    x = x + float(amplitude) * torch.rand(x.shape, generator=gen)
    return ArrayData(x, data.labels, data.classes)


DATASETS: dict[str, Callable[..., ArrayData]] = {
    "cifar10": _packed_or_torchvision("cifar10", "cifar10", "CIFAR10", "cifar-10-batches-py"),
    "cifar100": _packed_or_torchvision("cifar100", "cifar100", "CIFAR100", "cifar-100-python"),
    "svhn": _packed_or_torchvision("svhn", "svhn", "SVHN", "{train,test}_32x32.mat"),
    "mnist": _torchvision_only("mnist", "MNIST", "MNIST/raw"),
    "fashionmnist": _fashion_mnist,
    "tinyimagenet_crop": _ood_pack("tinyimagenet_crop", "tinyimagenet-crop"),
    "tinyimagenet_resize": _ood_pack("tinyimagenet_resize", "tinyimagenet-resize"),
    "textures": _image_folder("textures", "dtd/images"),
    "lsun": _image_folder("lsun", "LSUN"),
    "lsun_resize": _image_folder("lsun_resize", "LSUN_resize"),
    "isun": _image_folder("isun", "iSUN"),
    "places365": _image_folder("places365", "places365"),
    "imagefolder": _image_folder("imagefolder", "imagefolder"),
    **{name: _synthetic(name) for name in synthetic.SYNTHETIC},
    "additive_noise": additive_noise,  # a registered set plus noise, e.g. VMDLS's "MNIST-noise"
}


#: classes of the labelled datasets whose count is fixed (``data.known_classes`` is checked against
#: it before any file is read)
CLASS_COUNTS = {"cifar10": 10, "cifar100": 100, "svhn": 10, "mnist": 10, "fashionmnist": 10, "stripes": 2,
                "moons": 2}


def load_dataset(name: str, split: str = "train", root: str | os.PathLike = ".", download: bool = False,
                 cache_dir: str | os.PathLike | None = None, **kwargs) -> ArrayData:
    """Load split ``split`` of dataset ``name`` (see :data:`DATASETS`) as tensors."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    data = DATASETS[name](root=Path(root), split=split, download=download, cache_dir=cache_dir, **kwargs)
    if len(data) == 0:
        raise ConfigError(f"dataset {name!r} (split {split!r}) is empty: check the files under {root}")
    return data


def select_classes(data: ArrayData, classes: list[int], relabel: bool) -> ArrayData:
    """Keep the samples of ``classes``; with ``relabel`` map them to 0..len(classes)-1 in that order."""
    classes = [int(c) for c in classes]
    keep = torch.isin(data.labels, torch.tensor(classes))
    out = data.subset(keep.nonzero().squeeze(1))
    if relabel:
        lut = torch.full((max(int(data.labels.max()), *classes) + 1,), -1, dtype=torch.int64)
        lut[torch.tensor(classes)] = torch.arange(len(classes))
        names = tuple(data.classes[c] for c in classes) if data.classes else ()
        out = ArrayData(out.images, lut[out.labels], names)
    return out


def default_data_root() -> str:
    """``$OOD_LIGHTNING_DATA``, else the project's sibling ``shared/data``, else ``./data``."""
    return shared_root("OOD_LIGHTNING_DATA", "data")
