"""Counting the operations that make the host wait for an accelerator.

A training step on a GPU is fast only while Python runs ahead of the kernels it launched.
Any read of a device value on the host (``loss.item()``, ``if torch.isfinite(loss)``,
``float(t)``) or any op whose output size depends on the data (``x[mask]``, ``nonzero``,
``unique``) blocks until the GPU has caught up; once per step is enough to leave the GPU idle
while the next step's Python runs. ``HostSyncCounter`` records these at the dispatcher, so
it finds them on the CPU too, where no GPU is needed to see them.

Not visible on the CPU: device-to-host copies by ``.cpu()`` / ``.numpy()`` / ``.tolist()`` and
host-to-device copies by ``torch.tensor(..., device=...)`` (no op is dispatched when source
and target are both the CPU). Per-step code is kept free of those by review.
"""

from __future__ import annotations

import json
import logging
import traceback
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
log = logging.getLogger(__name__)

#: ops that read a value on the host or whose output shape depends on the data
_SYNC_OPS = {
    aten._local_scalar_dense.default: "item()/bool()/float() of a tensor",
    aten.nonzero.default: "nonzero (e.g. torch.where(cond))",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_consecutive.default: "unique_consecutive",
    aten.unique_dim.default: "unique(dim=...)",
    aten.repeat_interleave.Tensor: "repeat_interleave without output_size",
}
_BOOL_INDEX_OPS = {aten.index.Tensor: "x[bool mask]", aten.index_put_.default: "x[bool mask] = v",
                   aten.index_put.default: "x[bool mask] = v"}
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ())


def _caller() -> str:
    """The innermost frame outside torch: the line that asked for the sync."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        name = frame.filename
        if "/torch/" in name or name == __file__:
            continue
        if name.startswith(_PACKAGE_ROOT):
            name = name[len(_PACKAGE_ROOT) + 1:]
        elif "site-packages/" in name:
            name = name.split("site-packages/", 1)[1]
        return f"{name}:{frame.lineno} ({frame.name})"
    return "?"


@dataclass
class SyncEvent:
    op: str
    where: str


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as c: ...`` then ``c.events``: every host-synchronising op.

    With ``device_tensors`` (parameters, buffers, the batch), only reads of those tensors and
    of everything computed from them count: on a GPU these live on the device. Reads of
    tensors that stay on the host by design even then (an optimiser's step counter, a random
    draw made on the CPU) are left out, which a CPU run could not tell apart otherwise.
    """

    def __init__(self, device_tensors=None):
        super().__init__()
        self.events: list[SyncEvent] = []
        self.ops = 0  # every op dispatched: on a GPU about one kernel launch each
        self.track = device_tensors is not None
        self._device: dict[int, weakref.ref] = {}
        for t in device_tensors or ():
            self._mark(t)

    def _mark(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self._device[id(t)] = weakref.ref(t)

    def _on_device(self, t) -> bool:
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        what = _SYNC_OPS.get(func)
        if what is None and func in _BOOL_INDEX_OPS and _has_bool_index(args):
            what = _BOOL_INDEX_OPS[func]
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        from_device = not self.track or any(self._on_device(t) for t in inputs)
        if what is not None and from_device:
            self.events.append(SyncEvent(what, _caller()))
        out = func(*args, **kwargs)
        if self.track and from_device:
            for t in pytree.tree_leaves(out):
                self._mark(t)
        return out


@dataclass
class StepSyncs:
    """Host syncs per training step, counted from one batch start to the next."""

    per_step: list[int] = field(default_factory=list)
    sites: Counter = field(default_factory=Counter)
    ops_per_step: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.per_step) / max(len(self.per_step), 1)

    def summary(self, top: int = 5) -> str:
        if not self.per_step:
            return "no steps counted"
        head = (f"{self.mean:.2f} host syncs per training step (min {min(self.per_step)}, "
                f"max {max(self.per_step)}, {len(self.per_step)} steps; "
                f"{sum(self.ops_per_step) / len(self.ops_per_step):.0f} ops dispatched per step)")
        lines = [f"  {n:4d}x  {where}: {op}" for (op, where), n in self.sites.most_common(top)]
        return "\n".join([head, *lines])


class CountHostSyncs(L.Callback):
    """Counts host syncs of every training step after ``skip`` warm-up steps of each epoch.

    A step's count runs from its ``on_train_batch_start`` to the next one (or to the epoch's
    end), so it covers the forward, backward, optimiser, logging and progress-bar work that
    Lightning does between batches. Epoch-end work (validation, schedulers) is not a step.
    """

    def __init__(self, skip: int = 2):
        self.skip = skip
        self.result = StepSyncs()
        self._mode: HostSyncCounter | None = None

    def _close(self) -> None:
        if self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        self.result.per_step.append(len(self._mode.events))
        self.result.ops_per_step.append(self._mode.ops)
        self.result.sites.update((e.op, e.where) for e in self._mode.events)
        self._mode = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close()
        if batch_idx >= self.skip:
            self._mode = HostSyncCounter(device_tensors=[*pl_module.parameters(), *pl_module.buffers(),
                                                         *pytree.tree_leaves(batch)])
            self._mode.__enter__()

    def on_train_epoch_end(self, trainer, pl_module):
        # the last step of an epoch also ran epoch-end bookkeeping by now: not counted
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        log.info("%s", self.result.summary())
        out = Path(trainer.default_root_dir) / "host_syncs.json"
        out.write_text(json.dumps({"per_step": self.result.per_step, "mean": self.result.mean,
                                   "ops_per_step": self.result.ops_per_step,
                                   "sites": [{"op": op, "where": where, "count": n}
                                             for (op, where), n in self.result.sites.most_common()]}, indent=1))

    def on_exception(self, trainer, pl_module, exception):
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
