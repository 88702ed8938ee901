"""Test-time BatchNorm-statistics adaptation: normalise with statistics of the data being
scored instead of the training set's, without changing a single weight.

The seed thesis finds that a VAE's higher likelihood on some OOD sets largely goes away
when the *encoder's* BatchNorm statistics come from the test stream (so an OOD batch is no
longer normalised as if it were CIFAR). Two ways to take the statistics:

* :func:`batch_statistics` - every BN layer normalises each batch with that batch's own
  mean and variance (BN in training mode; running statistics restored on exit). Needs
  nothing but the batch itself, so it runs inside the one evaluation pass.
* :func:`reestimate_bn_stats` - reset the running statistics and re-estimate them as the
  equal-weight average over a whole stream of batches (``momentum=None``, like
  :func:`torch.optim.swa_utils.update_bn`, but for a chosen part of a model and any
  forward function); then score with them in eval mode.

Neither touches parameters (BN's affine weight and bias included): only the buffers
``running_mean``, ``running_var`` and ``num_batches_tracked`` change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ood_lightning.core.errors import ConfigError

#: which part of a VAE has its BatchNorm statistics adapted (``method.adapt_bn``)
PARTS = ("none", "encoder", "decoder", "both")

BNState = list[dict[str, Tensor]]


def check_part(part: str) -> str:
    if part not in PARTS:
        raise ConfigError(f"method.adapt_bn={part!r} must be one of {', '.join(PARTS)}")
    return part


def batch_norms(*modules: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer (1d/2d/3d, with running statistics) inside ``modules``."""
    return [m for module in modules for m in module.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats]


def bn_state(bns: list[_BatchNorm]) -> BNState:
    """Copies of the running statistics of ``bns`` (for :func:`load_bn_state`)."""
    return [{"running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
             "num_batches_tracked": bn.num_batches_tracked.clone()} for bn in bns]


@torch.no_grad()
def load_bn_state(bns: list[_BatchNorm], state: BNState) -> None:
    if len(bns) != len(state):
        raise ValueError(f"{len(state)} saved BatchNorm states for {len(bns)} layers")
    for bn, s in zip(bns, state):
        for name, value in s.items():
            getattr(bn, name).copy_(value)


@contextmanager
def batch_statistics(bns: list[_BatchNorm]) -> Iterator[None]:
    """Within the block, ``bns`` normalise every batch with its own statistics; on exit
    their running statistics and train/eval modes are exactly as before."""
    saved, modes = bn_state(bns), [bn.training for bn in bns]
    for bn in bns:
        bn.train()
    try:
        yield
    finally:
        load_bn_state(bns, saved)
        for bn, mode in zip(bns, modes):
            bn.train(mode)


@torch.no_grad()
def reestimate_bn_stats(bns: list[_BatchNorm], batches: Iterable[Any], forward: Callable[[Any], Any]) -> int:
    """Reset the running statistics of ``bns`` and re-estimate them over ``batches``.

    ``forward(batch)`` runs whatever part of the model feeds ``bns`` (e.g. the encoder on
    preprocessed test images). Each batch contributes equally (cumulative average). The
    layers are left in their previous train/eval mode; returns the number of batches seen.
    """
    modes, momenta = [bn.training for bn in bns], [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    n = 0
    try:
        for batch in batches:
            forward(batch)
            n += 1
    finally:
        for bn, mode, momentum in zip(bns, modes, momenta):
            bn.momentum = momentum
            bn.train(mode)
    if n == 0:
        raise ValueError("reestimate_bn_stats got no batches")
    return n
