"""A data loader for splits that live on the training device (``data.loader=gpu``).

On CIFAR-scale data a per-sample ``DataLoader`` cannot feed a GPU at 10k+ images/s: the
loader becomes the limit (airbench). :class:`DeviceLoader` keeps the whole split (uint8
images and labels) on the device and makes every batch by one tensor index; shuffling
is a seeded permutation per epoch and augmentation/normalisation stay where they are,
in the data module's ``on_after_batch_transfer`` (:class:`~ood_lightning.data.transforms.Preprocess`,
batched on the device). There is no per-sample Python and no host-to-device copy per batch.

Order. The permutation of epoch ``e`` is ``randperm(n)`` from a CPU generator seeded
with ``seed + e`` (CPU, so the order is the same on every device and every rank), copied
to the device once per epoch. Lightning calls ``loader.sampler.set_epoch(epoch)`` before
every epoch (it looks for ``.sampler.set_epoch`` as it does for a ``DistributedSampler``),
so a resumed run continues the same sequence; a plain loop that never calls ``set_epoch``
still gets a new order per epoch, because each pass advances the epoch by one.

DDP. Every rank draws the same permutation and takes every ``world_size``-th index from
its rank on, as ``DistributedSampler`` does: the shards are disjoint and every rank has
the same number of batches (collectives stay in step). With ``drop_last`` the tail that
does not fill a sample per rank and a whole batch is dropped; without it the permutation
is padded by wrapping around (a few samples seen twice), again as ``DistributedSampler``.

The CPU path (``data.loader=cpu``) draws the same order: :class:`EpochBatchSampler` hands the
permutation's batches to a ``DataLoader`` as index lists, so a run resumed from a checkpoint sees
the batches an uninterrupted run would have seen (a shuffling ``DataLoader`` draws its order from
the global RNG, which Lightning's checkpoint does not hold).

Evaluation (``scoring/passes.py``) does not shuffle and needs every sample exactly once
in order: :func:`shard_range` gives each rank a contiguous block instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, Sampler


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous block of ``range(n)``: blocks in rank order cover ``0..n-1``
    exactly once (the last ranks may get fewer, possibly zero, samples)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    per_rank = math.ceil(n / world_size)
    return range(min(n, rank * per_rank), min(n, (rank + 1) * per_rank))


class EpochOrder(Sampler):
    """A training order that is a function of (seed, epoch) alone, so a resumed run can continue it.

    Lightning calls ``set_epoch(e)`` before every epoch; ``resume_at(e, k)`` makes the next pass
    epoch ``e`` without its first ``k`` batches (a run resumed from a mid-epoch checkpoint,
    e.g. one saved on SIGTERM). ``len`` stays the whole epoch's, as Lightning counts the
    resumed epoch's batches from ``k``.
    """

    def set_epoch(self, epoch: int) -> None:
        raise NotImplementedError

    def resume_at(self, epoch: int, batches_done: int) -> None:
        raise NotImplementedError


class EpochPermutation(EpochOrder):
    """Batches of indices into ``range(n)`` for one rank: seeded shuffling per epoch, DDP shards.

    ``set_epoch(e)`` fixes the next pass's epoch; each pass then advances it by one.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, drop_last: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError("EpochPermutation needs at least one sample")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.n, self.batch_size, self.shuffle, self.drop_last = int(n), int(batch_size), bool(shuffle), bool(drop_last)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches) the next pass leaves out
        # samples per rank: like DistributedSampler (drop the uneven tail, or pad by wrapping around)
        per_rank = self.n // self.world_size if self.drop_last else math.ceil(self.n / self.world_size)
        if per_rank == 0:
            raise ValueError(f"{self.n} samples cannot give every one of {self.world_size} ranks a sample")
        self.num_samples = per_rank
        self.num_batches = per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)
        if self.num_batches == 0:
            raise ValueError(f"drop_last with batch_size={self.batch_size} leaves no batch of the {per_rank} samples "
                             "per rank; lower the batch size or set drop_last=False")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        self.epoch, self._skip = int(epoch), (int(epoch), int(batches_done))

    def __len__(self) -> int:
        return self.num_batches

    def next_pass(self) -> Tensor:
        """This pass's indices (less what a mid-epoch resume already trained on); advances the epoch."""
        index = self.indices()
        skip, self._skip = self._skip, None
        if skip is not None and skip[0] == self.epoch:
            index = index[skip[1] * self.batch_size:]
        self.epoch += 1
        return index

    def indices(self, epoch: int | None = None) -> Tensor:
        """This rank's sample indices for ``epoch`` (default: the current one), on the CPU."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed((self.seed + epoch) % 2**63))
        else:
            order = torch.arange(self.n)
        total = self.num_samples * self.world_size
        if total > self.n:  # pad by wrapping around, as DistributedSampler does
            order = torch.cat([order] * math.ceil(total / self.n))
        mine = order[:total][self.rank::self.world_size]
        return mine[: self.num_batches * self.batch_size] if self.drop_last else mine

    def __iter__(self) -> Iterator[Tensor]:
        yield from self.next_pass().split(self.batch_size)


class EpochBatchSampler(BatchSampler, EpochOrder):
    """:class:`EpochPermutation`'s batches as index lists, the ``batch_sampler`` of a ``DataLoader``.

    Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler`` (not on the batch sampler),
    so ``sampler`` is the permutation itself. ``dist_sampler`` is accepted because Lightning
    re-creates a custom batch sampler with ``sampler=DistributedSampler(...)`` under DDP (it
    records the arguments of ``BatchSampler`` subclasses only, hence the base class); only its
    ``num_replicas`` / ``rank`` are read (explicit ``num_replicas`` / ``rank`` win).
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, drop_last: bool = False, seed: int = 0,
                 sampler=None, num_replicas: int | None = None, rank: int | None = None):
        # BatchSampler.__init__ is not called: it validates a plain sampler we do not have
        world = num_replicas if num_replicas is not None else getattr(sampler, "num_replicas", 1)
        rank = rank if rank is not None else getattr(sampler, "rank", 0)
        self.sampler = EpochPermutation(n, batch_size, shuffle, drop_last, seed, rank, world)
        self.batch_size, self.drop_last = int(batch_size), bool(drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        self.sampler.resume_at(epoch, batches_done)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            yield batch.tolist()


class DeviceLoader:
    """``(images[idx], labels[idx])`` batches of a split held on ``device``; a plain iterable
    with ``__len__`` that Lightning takes as a train or val dataloader.

    ``images``/``labels`` are copied to ``device`` once (uint8 stays uint8: CIFAR-10 is
    150 MB). ``sampler`` is the :class:`EpochPermutation` (``set_epoch``, ``len``).
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, device: torch.device | str = "cpu", rank: int = 0,
                 world_size: int = 1):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = int(batch_size)
        self.sampler = EpochPermutation(len(labels), batch_size, shuffle, drop_last, seed, rank, world_size)
        self.batch_sampler = None  # Lightning reads it when a loader has a ``sampler``

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        index = self.sampler.next_pass().to(self.device, non_blocking=True)  # one copy per epoch, then only device indexing
        for batch in index.split(self.batch_size):
            yield self.images[batch], self.labels[batch]

    def __repr__(self) -> str:
        s = self.sampler
        return (f"DeviceLoader(n={s.n}, batch_size={s.batch_size}, shuffle={s.shuffle}, drop_last={s.drop_last}, "
                f"rank={s.rank}/{s.world_size}, device={self.device}, batches={len(self)})")
