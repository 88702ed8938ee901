"""Weight initialisation shared by the conv backbones trained from scratch."""

from __future__ import annotations

from torch import nn


def kaiming_init(module: nn.Module) -> None:
    """He (fan-out) init for convs, unit/zero BatchNorm: keeps activations from vanishing in
    deep ReLU nets trained from scratch (as in the WRN, ResNet and DenseNet authors' code)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
