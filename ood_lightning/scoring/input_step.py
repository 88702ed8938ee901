"""The sign step of input pre-processing (ODIN, Mahalanobis) in pixel units.

Inputs reach the model standardised per channel, x = (pixel − mean_c) / std_c, so a step of ε
in pixel space is ε / std_c on the model's inputs: both reference codes divide the gradient's
sign by the std, and their ε (ODIN's 0.0014, Mahalanobis' grid) are in pixel units.

Without OOD data, ε is chosen as Generalized ODIN does (Hsu et al. 2020, used for the LSGM
paper's ODIN* / Mahalanobis*): the ε of a grid that maximises the mean score of the perturbed
ID *validation* inputs, :func:`mean_scores_over_epsilons` and :func:`best_epsilon`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError


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


def check_epsilons(epsilons: Sequence[float] | None, detector: str) -> tuple[float, ...] | None:
    """A search grid of ε as floats (None: no search, the fixed ``epsilon`` is used)."""
    if epsilons is None:
        return None
    grid = tuple(float(e) for e in epsilons)
    if not grid or any(not e >= 0 for e in grid):
        raise ConfigError(f"detectors.{detector}.epsilons must be null or a non-empty list of values >= 0, "
                          f"got {list(epsilons)}")
    return grid


def mean_scores_over_epsilons(inputs: Tensor, epsilons: Sequence[float], batch_size: int,
                              direction: Callable[[Tensor], object],
                              score_at: Callable[[Tensor, object, float], Tensor]) -> dict[float, float]:
    """Mean score of the perturbed ``inputs`` for every ε of the grid (Generalized ODIN's search).

    ``direction(batch)`` is computed once per batch (the step direction does not depend on ε);
    ``score_at(batch, direction, ε)`` scores the batch stepped by ε along it. Sums are in
    float64, so small differences between ε (ODIN at T = 1000) are not lost.
    """
    if inputs is None or len(inputs) == 0:
        raise ConfigError("an ε search needs ID validation inputs (FitData.val_inputs), got none")
    totals = torch.zeros(len(epsilons), dtype=torch.float64)
    for batch in inputs.split(batch_size):
        d = direction(batch)
        with torch.no_grad():
            for i, eps in enumerate(epsilons):
                totals[i] += score_at(batch, d, float(eps)).double().sum().cpu()
    return dict(zip((float(e) for e in epsilons), (totals / len(inputs)).tolist()))


def best_epsilon(search: dict[float, float]) -> float:
    """The ε of the highest mean ID score; among equal maxima the smallest ε (the least perturbation)."""
    top = max(search.values())
    return min(e for e, s in search.items() if s == top)


def perturbation_setting(epsilon: float, epsilons: Sequence[float] | None) -> dict[str, object]:
    """:meth:`~ood_lightning.scoring.api.Scorer.setting` of a perturbing detector: ε (pixel units) and
    whether it was chosen on ID validation inputs from a grid or fixed; None when inputs are not perturbed."""
    if epsilon <= 0 and epsilons is None:
        return {"input_perturbation": None}
    return {"input_perturbation": {"epsilon": float(epsilon),
                                   "chosen": "on ID validation" if epsilons is not None else "fixed",
                                   "grid": None if epsilons is None else [float(e) for e in epsilons]}}


def epsilon_choice(search: dict[float, float], epsilon: float) -> dict[str, object]:
    """What an ε search chose, for :meth:`~ood_lightning.scoring.api.Scorer.selected`: the ε and the
    mean ID-validation score at every grid value (empty when no search ran)."""
    if not search:
        return {}
    return {"epsilon": epsilon, "mean_id_val_score": {f"{e:g}": s for e, s in search.items()}}
