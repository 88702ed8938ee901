"""``method=lde``: latent density estimation (Cook, Lavoie & Waslander 2024), post hoc.

A frozen classifier (``backbone.checkpoint``) provides penultimate features; a normalizing
flow (``method/flow=glow|realnvp|maf|residual``) is fitted to them for about one epoch and
scores −bits/dim (:class:`~ood_lightning.methods.lde.latent_flow.LatentFlowDetector`). The
paper reports the flow on L2-normalised features (``lde``) and on raw ones
(``lde_unnormalized``); both are this method's own scores, beside the baselines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from ood_lightning.methods.lde.latent_flow import LatentFlowDetector
from ood_lightning.methods.posthoc import PostHoc


class LatentDensity(PostHoc):
    """``variants`` maps a score name to its feature normalisation (``l2`` | ``none``); ``fit``
    holds the flow's fitting settings shared by every variant (PCA, ε, Adam, epochs, batch)."""

    def __init__(self, backbone: nn.Module, num_classes: int, flow: Callable[[int], nn.Module],
                 variants: Mapping[str, str] | None = None, fit: Mapping | None = None) -> None:
        variants = dict(variants or {"lde": "l2", "lde_unnormalized": "none"})
        super().__init__(backbone, num_classes, scorers={
            name: LatentFlowDetector(flow=flow, normalize=norm, **dict(fit or {})) for name, norm in variants.items()})
