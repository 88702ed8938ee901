"""Flows by name for a feature dimension; ``conf/method/flow/*.yaml`` are partials of :func:`build_flow`
(``method/flow=glow|realnvp|maf|residual``), called with the dimension by DHM and LDE."""

from __future__ import annotations

from torch import nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.nn.flows.coupling import FLOWS
from ood_lightning.nn.flows.residual import ResidualFlow


def build_flow(dim: int, name: str = "glow", n_blocks: int | None = None, hidden: int | None = None, **kwargs) -> nn.Module:
    """A flow by config name for ``dim``-dimensional inputs; ``None`` keeps the builder's default."""
    sizes = {k: v for k, v in {"n_blocks": n_blocks, "hidden": hidden}.items() if v is not None}
    if name == "residual":
        return ResidualFlow(dim, **sizes, **kwargs)
    if name not in FLOWS:
        raise ConfigError(f"unknown flow {name!r}; choose one of {[*FLOWS, 'residual']} (conf/method/flow/)")
    return FLOWS[name](dim, **sizes, **kwargs)
