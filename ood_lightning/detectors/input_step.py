"""The sign step of input pre-processing (ODIN, Mahalanobis) in pixel units.

Inputs reach the model standardised per channel, x = (pixel − mean_c) / std_c, so a step of ε
in pixel space is ε / std_c on the model's inputs: both reference codes divide the gradient's
sign by the std, and their ε (ODIN's 0.0014, Mahalanobis' grid) are in pixel units.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ood_lightning.errors import ConfigError


def check_std(input_std: Sequence[float] | None, detector: str) -> list[float] | None:
    """The per-channel std as floats (None: inputs are used as they are), refusing non-positive values."""
    if input_std is None:
        return None
    if len(input_std) == 0 or any(not float(s) > 0 for s in input_std):
        raise ConfigError(f"detectors.{detector}.input_std must be null or a list of per-channel stds > 0, "
                          f"got {list(input_std)}")
    return [float(s) for s in input_std]


def sign_step(grad: Tensor, input_std: list[float] | None, detector: str) -> Tensor:
    """sign(grad) / std_c along dim 1 (the channels), in the gradient's dtype."""
    step = grad.sign()
    if input_std is None:
        return step
    if grad.ndim < 2 or grad.shape[1] != len(input_std):
        raise ConfigError(f"detectors.{detector}.input_std has {len(input_std)} channel(s) but the inputs have "
                          f"shape {tuple(grad.shape)}: pass the ID data's std (${{data.std}})")
    std = torch.tensor(input_std, dtype=grad.dtype, device=grad.device)
    return step / std.view(1, -1, *([1] * (grad.ndim - 2)))
