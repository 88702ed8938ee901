"""The backbone contract every feature extractor declares (no classifier head)."""

from __future__ import annotations

from torch import Tensor, nn


class Backbone(nn.Module):
    """``forward_features(x)`` gives the named stage outputs in network order, each stage once,
    ending with ``"penultimate"`` ([B, feature_dim]: the pooled last stage, not also returned
    under its own name); ``forward(x)`` is the penultimate features."""

    #: width of the penultimate features
    feature_dim: int

    def __init__(self) -> None:
        super().__init__()
        #: a classifier that came with pretrained weights (ImageNet models), else None
        self.pretrained_head: nn.Linear | None = None

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def unbounded_layers(self) -> list[nn.Module]:
        """Layers that spectral normalisation leaves free (e.g. an output projection, as DUE's
        ``FCResNet``); none by default."""
        return []

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)["penultimate"]
