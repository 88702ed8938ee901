"""Class-structured batches for metric learning: B_C random classes × B_N random examples each.

Triplet-style losses need several examples of several classes in every batch; a shuffled
loader gives that only by chance. :class:`ClassBatchSampler` draws, for every batch, B_C
distinct classes and B_N examples of each (walking a shuffled per-class order, so an epoch
sees every example about equally often). It is seeded, resumable per epoch
(``set_epoch``: Lightning calls it on ``batch_sampler.sampler``, which is therefore the
sampler itself, so a resumed run draws the epoch it resumes at), and DDP-aware: all ranks draw the same sequence of
batches and rank r keeps every W-th one, so shards are disjoint and each rank's batch keeps
the class structure the loss needs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler

from ood_lightning.core.errors import ConfigError
from ood_lightning.data.device_loader import EpochOrder


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ClassBatchSampler(BatchSampler, EpochOrder):
    """Yields lists of ``classes_per_batch * samples_per_class`` dataset indices.

    Args:
        labels: class label per dataset item ([N] ints; items with label < 0 are never drawn).
        classes_per_batch: B_C, distinct classes per batch (clamped to the number of classes).
        samples_per_class: B_N >= 2 examples per class (with replacement only for a class
            smaller than B_N).
        num_batches: batches per epoch *per rank*; default ``N // (B_C * B_N * world_size)``
            (one pass over the data across all ranks), at least 1.
        seed: the draw of epoch e depends only on (seed, e).
        sampler: accepted so that Lightning can inject a ``DistributedSampler`` when it
            re-creates the batch sampler under DDP; only its ``num_replicas`` / ``rank`` are read.
        num_replicas, rank: explicit sharding; default: the ``sampler``'s, else the
            initialised ``torch.distributed`` group's, else a single process.
    """

    def __init__(self, labels: Tensor | np.ndarray, classes_per_batch: int, samples_per_class: int,
                 num_batches: int | None = None, seed: int = 0, sampler=None, num_replicas: int | None = None,
                 rank: int | None = None, drop_last: bool = True) -> None:
        # BatchSampler.__init__ is not called: it validates a plain sampler we do not have.
        labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
        self.classes = np.unique(labels[labels >= 0])
        if len(self.classes) < 2:
            raise ConfigError(f"class-structured batches need at least 2 classes, got {len(self.classes)}")
        if int(samples_per_class) < 2:
            raise ConfigError(f"samples_per_class (B_N) must be >= 2 to form positive pairs, got {samples_per_class}")
        if int(classes_per_batch) < 2:
            raise ConfigError(f"classes_per_batch (B_C) must be >= 2 to form negatives, got {classes_per_batch}")
        self.labels = labels
        self.classes_per_batch = min(int(classes_per_batch), len(self.classes))
        self.samples_per_class = int(samples_per_class)
        self.batch_size = self.classes_per_batch * self.samples_per_class
        self.drop_last = drop_last
        # Lightning sets the epoch through ``loader.batch_sampler.sampler.set_epoch`` only
        self.sampler = self
        self.seed = int(seed)
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches) the next pass leaves out
        self._num_batches = None if num_batches is None else int(num_batches)
        self._num_replicas = num_replicas if num_replicas is not None else getattr(sampler, "num_replicas", None)
        self._rank = rank if rank is not None else getattr(sampler, "rank", None)
        self._members = [np.flatnonzero(labels == c) for c in self.classes]

    # -- sharding ------------------------------------------------------------------------
    @property
    def num_replicas(self) -> int:
        return int(self._num_replicas) if self._num_replicas is not None else _world()[1]

    @property
    def rank(self) -> int:
        return int(self._rank) if self._rank is not None else _world()[0]

    def __len__(self) -> int:
        if self._num_batches is not None:
            return self._num_batches
        n = int((self.labels >= 0).sum())
        return max(1, n // (self.batch_size * self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``__iter__`` draw epoch ``epoch`` (Lightning calls this every epoch)."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """The next pass: epoch ``epoch`` less its first ``batches_done`` batches (drawn, not yielded)."""
        self.epoch, self._skip = int(epoch), (int(epoch), int(batches_done))

    # -- drawing -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        world, rank = self.num_replicas, self.rank
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        rng = np.random.default_rng([self.seed, self.epoch])
        skip, self._skip = self._skip, None
        skip = skip[1] if skip is not None and skip[0] == self.epoch else 0
        self.epoch += 1  # a loop without set_epoch still gets a new draw next time
        order = [rng.permutation(m) for m in self._members]
        cursor = [0] * len(order)
        for step in range(len(self) * world):
            batch = []
            for k in rng.choice(len(self.classes), self.classes_per_batch, replace=False):
                members = order[k]
                if len(members) < self.samples_per_class:
                    batch.append(rng.choice(members, self.samples_per_class, replace=True))
                    continue
                if cursor[k] + self.samples_per_class > len(members):
                    order[k] = members = rng.permutation(members)
                    cursor[k] = 0
                batch.append(members[cursor[k]: cursor[k] + self.samples_per_class])
                cursor[k] += self.samples_per_class
            if step % world == rank:  # every rank draws the same sequence and keeps its share
                if skip:
                    skip -= 1
                    continue
                yield np.concatenate(batch).tolist()
