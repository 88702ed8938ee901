"""How the evaluation's work is split over DDP ranks, as an explicit value (no module state).

With ``Ranks.of_process_group()`` every rank runs the pass over its contiguous block of each
split (:func:`~ood_lightning.data.device_loader.shard_range`) and the blocks are gathered
from all ranks (``all_gather_object``, rank order = data order), so each rank ends up with
the same full outputs one process would have. Every rank must make the same calls in the
same order. ``SINGLE`` (one process) makes every method a plain call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ood_lightning.data.device_loader import DeviceLoader, shard_range
from ood_lightning.scoring.api import Outputs


def process_group_size() -> int:
    """Processes in the default process group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def of_process_group(cls, enabled: bool = True) -> Ranks:
        """This process's place in the default process group (``SINGLE`` when disabled or alone)."""
        if not enabled or process_group_size() == 1:
            return SINGLE
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order (``[obj]`` with one process)."""
        if self.world == 1:
            return [obj]
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts

    def block(self, n: int) -> range:
        return range(n) if self.world == 1 else shard_range(n, self.rank, self.world)

    def shard(self, loader):
        """The same loader over this rank's contiguous block of its data (None if the block is empty)."""
        if self.world == 1:
            return loader
        if isinstance(loader, DeviceLoader):
            b = self.block(len(loader.labels))
            return DeviceLoader(loader.images[b.start:b.stop], loader.labels[b.start:b.stop], loader.batch_size,
                                device=loader.device) if len(b) else None
        if not isinstance(loader, DataLoader):
            raise TypeError(f"cannot split a {type(loader).__name__} across ranks; pass a DataLoader or DeviceLoader")
        b = self.block(len(loader.dataset))
        if not len(b):
            return None
        return DataLoader(Subset(loader.dataset, b), batch_size=loader.batch_size, shuffle=False,
                          collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory)

    def run_sharded(self, loader, fn: Callable[[Any], Any], combine: Callable[[list], Any]):
        """``fn(loader)`` with each rank on its block, the parts combined in data order."""
        if self.world == 1:
            return fn(loader)
        mine = self.shard(loader)
        return combine([p for p in self.gather(None if mine is None else fn(mine)) if p is not None])

    def map_outputs(self, fn: Callable[[Outputs], Tensor], outputs: Outputs) -> Tensor:
        """``fn(outputs)`` for a per-sample ``fn`` (a scorer's ``score``), each rank on its block."""
        if self.world == 1:
            return fn(outputs)
        b = self.block(len(outputs))
        mine = fn(outputs.subset(torch.arange(b.start, b.stop))).detach().cpu() if len(b) else None
        return torch.cat([p for p in self.gather(mine) if p is not None])


SINGLE = Ranks()
