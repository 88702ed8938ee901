"""``OODDataModule``: ID train/val/test splits and named OOD test sets, all in memory.

Batches are uint8 tensors indexed in one go (``__getitems__``) and turned into
normalised floats by :class:`~ood_lightning.data.transforms.Preprocess` after they reach
the device, so augmentation runs batched on the GPU when there is one.

The trainer's train/val loaders (``data.loader``): ``gpu`` keeps the whole split on the
trainer's device (:class:`~ood_lightning.data.device_loader.DeviceLoader`: no per-batch
copy, seeded shuffling, DDP shards); ``cpu`` is a ``DataLoader`` over the in-memory split;
``auto`` (default) takes ``gpu`` when the trainer runs on CUDA and the split takes at most
``DEVICE_LOADER_MAX_FRACTION`` of the GPU's memory, else ``cpu``. Evaluation loaders
(``fit_dataloader``, ``eval_dataloaders``) are always ``DataLoader``s: one pass each.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from ood_lightning.core.errors import ConfigError
from ood_lightning.data.device_loader import DeviceLoader, EpochBatchSampler, EpochOrder
from ood_lightning.data.registry import ArrayData, load_dataset, select_classes
from ood_lightning.data.schema import data_config, ood_set_config
from ood_lightning.data.transforms import Preprocess, match_shape

log = logging.getLogger(__name__)

#: keys of an OOD set's config that the data module reads itself; the rest go to the loader
_OOD_KEYS = {"dataset", "split", "convert", "limit", "classes", "group"}
#: data.loader=auto puts a split on the GPU when it takes at most this fraction of its memory
DEVICE_LOADER_MAX_FRACTION = 0.25
_LOADERS = ("auto", "gpu", "cpu")


class TensorData(Dataset):
    """A split as a dataset whose batches are fetched by one tensor index, not per sample."""

    def __init__(self, data: ArrayData):
        self.images, self.labels = data.images, data.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __getitems__(self, indices):
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


def _keep_batch(batch):
    return batch


def _fixed_subset(data: ArrayData, n: int | None, seed: int) -> ArrayData:
    """A deterministic random subset of ``n`` samples (independent of the run seed)."""
    if n is None or n >= len(data):
        return data
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(perm[: int(n)].sort().values)


def _plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})


class OODDataModule(L.LightningDataModule):
    """ID data (``data`` config group) plus named OOD test sets (``ood`` config group)."""

    def __init__(self, data: Mapping, ood: Mapping | None = None):
        super().__init__()
        self.cfg = data_config(_plain(data))
        self.ood_cfg = {k: ood_set_config(_plain(v)) for k, v in _plain(ood).items() if v is not None}
        c = self.cfg
        aug = c["augment"]
        self.preprocess = Preprocess(c["mean"], c["std"], aug["crop_padding"],
                                     aug["hflip"], c["dequantize"], aug.get("crop_padding_mode", "zeros"))
        self.train_set = self.val_set = self.test_set = None
        self.ood_sets: dict[str, ArrayData] = {}
        self.class_names: tuple[str, ...] = ()
        #: labels -> a batch sampler for training, or None for shuffled batches (a method's own, set by the run)
        self.batch_sampler_factory: Callable[[torch.Tensor], Sampler | None] | None = None
        self._content_digests: dict[str, str] = {}
        #: (epoch, training batches done in it), saved in checkpoints; where a resumed run starts
        self._train_progress: tuple[int, int] = (0, 0)
        self._resume_at: tuple[int, int] | None = None

    # -- loading -------------------------------------------------------------------------
    def _load(self, name: str, split: str, **kwargs) -> ArrayData:
        c = self.cfg
        return load_dataset(name, split=split, root=c["root"], download=c["download"],
                            cache_dir=c["cache_dir"], **kwargs)

    def id_split(self, split: str) -> ArrayData:
        """The ID set's ``split`` (``data.known_classes`` kept and relabelled), read on its own: no other split is loaded."""
        c = self.cfg
        kwargs = dict(c["kwargs"])
        kwargs.setdefault("seed", int(c["split_seed"]))
        if split in ("train", "test") and f"n_{split}" in c:
            kwargs["n"] = c[f"n_{split}"]
        data = self._load(c["name"], split, **kwargs)
        if c["known_classes"] is not None:
            data = select_classes(data, c["known_classes"], relabel=True)
            if len(data) == 0:
                raise ConfigError(f"data.known_classes={c['known_classes']} leaves no {split} samples of {c['name']!r}")
        return data

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        c = self.cfg
        seed = int(c["split_seed"])
        full = self.id_split("train")
        self.class_names = full.classes
        val_size = c["val_size"]
        n_val = int(round(val_size * len(full))) if isinstance(val_size, float) and val_size < 1 else int(val_size)
        if not 0 < n_val < len(full):
            raise ConfigError(f"data.val_size={val_size} must leave both a validation and a training set ({len(full)} samples)")
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
        self.val_set = full.subset(perm[:n_val].sort().values)
        self.train_set = full.subset(perm[n_val:].sort().values)
        self.train_set = _fixed_subset(self.train_set, c["limit_train"], seed + 1)
        self.val_set = _fixed_subset(self.val_set, c["limit_val"], seed + 2)
        self.test_set = _fixed_subset(self.id_split("test"), c["limit_test"], seed + 3)
        self._check_channels()
        for name, spec in self.ood_cfg.items():
            self.ood_sets[name] = self._load_ood(name, spec)
        log.info("ID %s: train %d, val %d, test %d, %d classes; OOD: %s", c["name"], len(self.train_set),
                 len(self.val_set), len(self.test_set), self.num_classes,
                 ", ".join(f"{k} ({len(v)})" for k, v in self.ood_sets.items()) or "none")

    def _check_channels(self) -> None:
        want = self.cfg["channels"]
        shape = self.train_set.sample_shape
        if want is not None and len(shape) == 3 and shape[0] != want:
            raise ConfigError(f"data.channels={want} but {self.cfg['name']!r} has {shape[0]}-channel images; set data.channels={shape[0]}")

    def _load_ood(self, name: str, spec: dict) -> ArrayData:
        if "dataset" not in spec:
            raise ConfigError(f"OOD set {name!r} needs a 'dataset' key (e.g. ood.{name}.dataset=gaussian_noise)")
        kwargs = {k: v for k, v in spec.items() if k not in _OOD_KEYS}
        shape = self.train_set.sample_shape
        kwargs.setdefault("shape", shape)
        if len(shape) == 3:
            kwargs.setdefault("image_size", shape[-1])
        data = self._load(spec["dataset"], spec["split"], **kwargs)
        classes = spec["classes"]
        if classes == "unknown":
            known = self.cfg["known_classes"]
            if known is None:
                raise ConfigError(f"OOD set {name!r} takes the held-out classes, but data.known_classes is null; "
                                  "choose a class split (e.g. data=mnist6 or data=cifar6) or other OOD sets "
                                  "(e.g. ood=[odin,mnist,noise] for CIFAR, ood=noise)")
            classes = sorted(set(data.labels.unique().tolist()) - set(known))
        if classes is not None:
            data = select_classes(data, classes, relabel=False)
        if len(data) == 0:
            raise ConfigError(f"OOD set {name!r} is empty (dataset {spec['dataset']!r}, classes {classes})")
        limit = spec["limit"]
        limit = self.cfg["limit_ood"] if limit is None else limit  # the set's own limit wins
        data = _fixed_subset(data, limit, int(self.cfg["split_seed"]) + 4)
        images = match_shape(data.images, shape, name, spec["convert"])
        return ArrayData(images, torch.full((len(data),), -1, dtype=torch.int64))

    # -- facts the model needs -----------------------------------------------------------
    @property
    def num_classes(self) -> int:
        known = self.cfg["known_classes"]
        if known is not None:
            return len(known)
        return int(self.train_set.labels.max()) + 1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.train_set.sample_shape

    def split_data(self, split: str) -> ArrayData:
        """The data of an evaluation split by name: ``id_train`` (before any fit limit), ``id_val``,
        ``id_test`` or an OOD set."""
        named = {"id_train": self.train_set, "id_val": self.val_set, "id_test": self.test_set, **self.ood_sets}
        if named.get(split) is None:
            raise ConfigError(f"no split {split!r} in this data module; it has {', '.join(named)}")
        return named[split]

    def content_digest(self, split: str) -> str:
        """sha256 of a split's decoded images and labels (bytes, dtype, shape), once per split.

        What the feature cache must follow: the same name and config over other files (another
        X
        50,000 training images (154 MB) on one CPU core.
        """
        if split not in self._content_digests:
            data = self.split_data(split)
            digest = hashlib.sha256()
            for t in (data.images, data.labels):
                t = t.detach().cpu().contiguous()
                digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
                digest.update(memoryview(t.numpy()).cast("B"))
            self._content_digests[split] = digest.hexdigest()[:16]
        return self._content_digests[split]

    def cache_key(self, split: str, limit: int | None = None) -> tuple[str, str, str]:
        """(dataset, split, tag) naming a split's inputs for the feature cache; the tag hashes
        everything that changes them: the split's decoded data itself (:meth:`content_digest`),
        and what is applied to it later (fit subset size and seed, normalisation, augmentation)."""
        keys = ("split_seed", "mean", "std", "augment", "dequantize")
        spec = {k: self.cfg[k] for k in keys}
        spec["content"] = self.content_digest(split)
        if split in self.ood_cfg:
            spec, dataset = {**spec, "ood": self.ood_cfg[split]}, self.ood_cfg[split]["dataset"]
        else:
            spec, dataset = {**spec, "limit": limit}, self.cfg["name"]
        digest = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return dataset, split, f"eval-{digest}"

    # -- loaders -------------------------------------------------------------------------
    def dataloader(self, data: ArrayData, train: bool) -> DataLoader:
        """One pass in order (evaluation, validation), or shuffled training batches whose order is a
        function of (run seed, epoch) only (:class:`EpochBatchSampler`), so a resumed run continues it.
        The loader's own generator keeps its iterators from drawing on the global RNG, whose stream
        the checkpoint restores (``OODMethod.on_load_checkpoint``)."""
        c = self.cfg
        workers = int(c["num_workers"])
        common = dict(collate_fn=_keep_batch, num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0))
        if not train:
            return DataLoader(TensorData(data), batch_size=int(c["eval_batch_size"] or c["batch_size"]),
                              shuffle=False, **common)
        return DataLoader(TensorData(data), batch_sampler=self._epoch_batches(data, int(c["batch_size"])), **common)

    def _epoch_batches(self, data: ArrayData, batch_size: int) -> EpochBatchSampler:
        """The training order of ``data.loader=cpu``: the permutation ``DeviceLoader`` draws (seed +
        epoch; the run's seed, which ``L.seed_everything`` sets on every rank), as index lists."""
        trainer = self.trainer
        rank, world = (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)
        return EpochBatchSampler(len(data), batch_size, shuffle=True, drop_last=len(data) > batch_size * world,
                                 seed=torch.initial_seed(), num_replicas=world, rank=rank)

    def _trainer_device(self) -> torch.device | None:
        trainer = self.trainer
        return None if trainer is None else trainer.strategy.root_device

    def loader_kind(self, data: ArrayData) -> str:
        """``gpu`` or ``cpu``: what ``data.loader`` resolves to for ``data`` with the attached trainer."""
        choice = str(self.cfg["loader"]).lower()
        if choice not in _LOADERS:
            raise ConfigError(f"data.loader={choice!r}: choose one of {', '.join(_LOADERS)}")
        device = self._trainer_device()
        if choice != "auto":
            return choice if device is not None else "cpu"
        if device is None or device.type != "cuda":
            return "cpu"
        size = data.images.nbytes + data.labels.nbytes
        total = torch.cuda.get_device_properties(device).total_memory
        return "gpu" if size <= DEVICE_LOADER_MAX_FRACTION * total else "cpu"

    def _trainer_loader(self, data: ArrayData, train: bool) -> DataLoader | DeviceLoader:
        """The loader the trainer iterates: on its device (``data.loader=gpu``) or a ``DataLoader``."""
        device = self._trainer_device()
        if device is not None:  # its mean/std buffers: no host-to-device copy (and sync) per batch
            self.preprocess.to(device)
        if self.loader_kind(data) == "cpu":
            return self.dataloader(data, train)
        c, trainer = self.cfg, self.trainer
        batch_size = int(c["batch_size"] if train else (c["eval_batch_size"] or c["batch_size"]))
        # the run's seed (L.seed_everything sets it on every rank); epochs add to it
        return DeviceLoader(data.images, data.labels, batch_size, shuffle=train,
                            drop_last=train and len(data) > batch_size * trainer.world_size,
                            seed=torch.initial_seed(), device=device, rank=trainer.global_rank,
                            world_size=trainer.world_size)

    def train_dataloader(self) -> DataLoader | DeviceLoader:
        """Shuffled batches, or the batches of ``batch_sampler_factory(labels)`` when it gives a
        sampler (the method's own, handed over by the run's assembly, e.g. VMDLS's B_C classes x B_N).
        A run resumed mid-epoch starts at the batch its checkpoint stopped after (:meth:`load_state_dict`)."""
        sampler = self.batch_sampler_factory(self.train_set.labels) if self.batch_sampler_factory else None
        if sampler is None:
            loader = self._trainer_loader(self.train_set, train=True)
            order = loader.sampler if isinstance(loader, DeviceLoader) else loader.batch_sampler
        else:
            workers = int(self.cfg["num_workers"])
            loader = DataLoader(TensorData(self.train_set), batch_sampler=sampler,
                                collate_fn=_keep_batch, num_workers=workers, persistent_workers=workers > 0,
                                pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0))
            order = sampler
        if self._resume_at is not None:
            if isinstance(order, EpochOrder):
                order.resume_at(*self._resume_at)
            else:
                log.warning("%s cannot start mid-epoch: the resumed epoch repeats its first batches",
                            type(order).__name__)
            self._resume_at = None
        return loader

    # -- where training is, for a checkpoint taken mid-epoch (e.g. on SIGTERM) ---------------
    def state_dict(self) -> dict:
        epoch, batches = self._train_progress
        return {"train_epoch": epoch, "train_batches": batches}

    def load_state_dict(self, state: dict) -> None:
        self._train_progress = (int(state["train_epoch"]), int(state["train_batches"]))
        self._resume_at = self._train_progress

    def val_dataloader(self) -> DataLoader | DeviceLoader:
        return self._trainer_loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.dataloader(self.test_set, train=False)

    def fit_dataloader(self, limit: int | None = None) -> DataLoader:
        """ID training data without augmentation (a fixed subset of ``limit``), for fitting detectors."""
        return self.dataloader(_fixed_subset(self.train_set, limit, int(self.cfg["split_seed"]) + 5), train=False)

    def eval_dataloaders(self) -> dict[str, DataLoader]:
        """Every evaluation split by name: ``id_val``, ``id_test`` and each OOD set."""
        loaders = {"id_val": self.dataloader(self.val_set, train=False), "id_test": self.test_dataloader()}
        loaders.update({name: self.dataloader(d, train=False) for name, d in self.ood_sets.items()})
        return loaders

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        training = self.trainer is not None and self.trainer.training
        if training:  # batches trained on in this epoch (a training batch is moved just before its step)
            epoch, done = self._train_progress
            self._train_progress = (self.trainer.current_epoch, done + 1 if epoch == self.trainer.current_epoch else 1)
        return self.preprocess(x, train=training), y
