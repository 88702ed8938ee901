"""Stopping on a non-finite loss without reading the loss on the host every step.

``every=1`` checks each loss as it comes (one host read per step: free on the CPU, a GPU
sync on CUDA) and stops before the update. With ``every=k`` the check stays on the device:
the index of the first bad step of a window and its loss terms are kept in device tensors
(``torch.where``), and the host reads one integer per ``k`` steps (and at each epoch's end).
The error still names the exact step and its terms; only the checkpoint is taken when the
window closes, i.e. after the updates that followed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError


@dataclass
class NonFinite:
    epoch: int
    step: int
    terms: dict[str, float]
    steps_late: int  # training steps between the bad one and its detection


@dataclass
class _Window:
    """One call site's pending checks: ``where`` on the host, the rest on the device."""

    names: tuple[str, ...]
    counter: Tensor
    first_bad: Tensor
    terms: Tensor
    where: list[tuple[int, int]] = field(default_factory=list)


class NonFiniteGuard:
    def __init__(self, every: int = 1):
        if int(every) < 1:
            raise ConfigError(f"nan_check_every must be >= 1 (or auto), got {every}")
        self.every = int(every)
        self._windows: dict[tuple[str, ...], _Window] = {}

    def check(self, loss: Tensor, terms: dict[str, Tensor], epoch: int, step: int) -> NonFinite | None:
        """Record one step's loss; return the first non-finite step once it is known (else None)."""
        if self.every == 1:
            if bool(torch.isfinite(loss.detach()).all()):
                return None
            return NonFinite(epoch, step, {k: float(v.detach().float().mean()) for k, v in terms.items()}, 0)
        names = tuple(terms)
        with torch.no_grad():
            values = torch.stack([v.detach().float().mean() for v in terms.values()])
            bad = ~torch.isfinite(loss.detach()).all()
            w = self._windows.get(names)
            if w is None:
                device = values.device
                w = self._windows[names] = _Window(names, torch.zeros((), dtype=torch.long, device=device),
                                                   torch.full((), -1, dtype=torch.long, device=device),
                                                   torch.zeros_like(values))
            first = bad & (w.first_bad < 0)
            w.first_bad = torch.where(first, w.counter, w.first_bad)
            w.terms = torch.where(first, values, w.terms)
            w.counter.add_(1)
        w.where.append((epoch, step))
        return self._close(names) if len(w.where) >= self.every else None

    def flush(self) -> NonFinite | None:
        """Read every pending window (an epoch's end): the first non-finite step, if any."""
        found = [f for f in (self._close(names) for names in list(self._windows)) if f is not None]
        return min(found, key=lambda f: (f.epoch, f.step)) if found else None

    def _close(self, names: tuple[str, ...]) -> NonFinite | None:
        w = self._windows.pop(names)
        index = int(w.first_bad)  # the one host read of the window
        if index < 0:
            return None
        epoch, step = w.where[index]
        values = w.terms.tolist()
        return NonFinite(epoch, step, dict(zip(w.names, values, strict=True)), len(w.where) - 1 - index)
