"""One forward pass per split: logits, penultimate and pooled layer features.

Across ranks (DDP): inside ``with across_ranks():`` (``score_everything(distributed=True)``)
every rank runs the pass over its contiguous block of each split (``shard_range``) and the
blocks are gathered from all ranks (``all_gather_object``, rank order = data order), so each
rank returns the same full outputs as one process would, and detectors and metrics that
follow see every sample. Every rank must make the same calls in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from rich.progress import Progress
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ood_lightning.data.device_loader import DeviceLoader, shard_range
from ood_lightning.detectors.base import Detector, Outputs, pool

_ACROSS_RANKS = False


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextmanager
def across_ranks(enabled: bool = True) -> Iterator[None]:
    """Within this block, ``extract``/``score_inputs``/``map_across_ranks`` split the work over
    the ranks of the default process group and gather the results (a no-op with one process)."""
    global _ACROSS_RANKS
    previous, _ACROSS_RANKS = _ACROSS_RANKS, bool(enabled) and _world_size() > 1
    try:
        yield
    finally:
        _ACROSS_RANKS = previous


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the work split in force: (0, 1) outside :func:`across_ranks`."""
    return (dist.get_rank(), dist.get_world_size()) if _ACROSS_RANKS else (0, 1)


def gather_across_ranks(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` with one process)."""
    if not _ACROSS_RANKS:
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def shard_loader(loader, rank: int, world_size: int):
    """The same loader over rank ``rank``'s contiguous block of its data (None if the block is empty)."""
    if world_size == 1:
        return loader
    if isinstance(loader, DeviceLoader):
        block = shard_range(len(loader.labels), rank, world_size)
        return DeviceLoader(loader.images[block.start:block.stop], loader.labels[block.start:block.stop],
                            loader.batch_size, device=loader.device) if len(block) else None
    if not isinstance(loader, DataLoader):
        raise TypeError(f"cannot split a {type(loader).__name__} across ranks; pass a DataLoader or DeviceLoader")
    block = shard_range(len(loader.dataset), rank, world_size)
    if not len(block):
        return None
    return DataLoader(Subset(loader.dataset, block), batch_size=loader.batch_size, shuffle=False,
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def cat_outputs(parts: list[Outputs | None]) -> Outputs:
    """Concatenate ``Outputs`` in order (``None`` parts, from empty shards, are skipped)."""
    parts = [p for p in parts if p is not None]
    if len(parts) == 1:
        return parts[0]
    labels = None if parts[0].labels is None else torch.cat([p.labels for p in parts])
    return Outputs(logits=torch.cat([p.logits for p in parts]), features=torch.cat([p.features for p in parts]),
                   layers={k: torch.cat([p.layers[k] for p in parts]) for k in parts[0].layers}, labels=labels,
                   extra={k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra})


def map_across_ranks(fn: Callable[[Outputs], dict[str, Tensor]], outputs: Outputs) -> dict[str, Tensor]:
    """``fn(outputs)`` for a per-sample ``fn`` (e.g. a method's ``ood_scores``), each rank on its block."""
    rank, world = rank_and_world()
    if world == 1:
        return fn(outputs)
    block = shard_range(len(outputs), rank, world)
    mine = {k: v.detach().cpu() for k, v in fn(outputs.subset(torch.arange(block.start, block.stop))).items()} \
        if len(block) else None
    parts = [p for p in gather_across_ranks(mine) if p is not None]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def extract(model, loader: DataLoader, preprocess: Callable[[Tensor], Tensor], device: torch.device,
            progress: Progress | None = None, description: str = "extracting") -> Outputs:
    """Run ``model`` over ``loader`` once and keep everything detectors may need (on CPU).

    Inside :func:`across_ranks`, each rank runs its block of ``loader`` and all blocks are gathered.
    """
    rank, world = rank_and_world()
    if world == 1:
        return _extract(model, loader, preprocess, device, progress, description)
    mine = shard_loader(loader, rank, world)
    out = None if mine is None else _extract(model, mine, preprocess, device, progress, description)
    return cat_outputs(gather_across_ranks(out))


def _extract(model, loader, preprocess, device, progress, description) -> Outputs:
    model.eval()
    logits, labels, layers, extra = [], [], {}, {}
    input_scores = getattr(model, "input_scores", None)
    task = progress.add_task(description, total=len(loader)) if progress else None
    for x, y in loader:
        x = preprocess(x.to(device))
        feats = model.forward_features(x)
        logits.append(model.classify(feats["penultimate"]).float().cpu())
        labels.append(y.cpu())
        for name, value in feats.items():
            layers.setdefault(name, []).append(pool(value).float().cpu())
        if input_scores is not None:  # method-specific per-input values (e.g. IWAE), same pass
            for name, value in input_scores(x).items():
                extra.setdefault(name, []).append(value.detach().float().cpu())
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    layers = {k: torch.cat(v) for k, v in layers.items()}
    return Outputs(logits=torch.cat(logits), features=layers["penultimate"], layers=layers, labels=torch.cat(labels),
                   extra={k: torch.cat(v) for k, v in extra.items()})


def score_inputs(detector: Detector, model, loader: DataLoader, preprocess, device: torch.device,
                 progress: Progress | None = None, description: str = "scoring") -> Tensor:
    """Scores of a detector that needs the inputs (e.g. ODIN's perturbation), batch by batch;
    inside :func:`across_ranks`, each rank scores its block of ``loader`` and the blocks are gathered."""
    rank, world = rank_and_world()
    if world == 1:
        return _score_inputs(detector, model, loader, preprocess, device, progress, description)
    mine = shard_loader(loader, rank, world)
    scores = None if mine is None else _score_inputs(detector, model, mine, preprocess, device, progress, description)
    return torch.cat([p for p in gather_across_ranks(scores) if p is not None])


def _score_inputs(detector, model, loader, preprocess, device, progress, description) -> Tensor:
    model.eval()
    scores = []
    task = progress.add_task(description, total=len(loader)) if progress else None
    for x, _ in loader:
        scores.append(detector.score_inputs(model, preprocess(x.to(device))).detach().float().cpu())
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    return torch.cat(scores)
