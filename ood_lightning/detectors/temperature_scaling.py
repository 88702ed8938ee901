"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017):
max softmax of logits/T with T fitted by NLL on labelled ID data."""

from __future__ import annotations

import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors.card import Card
from ood_lightning.detectors.fit_checks import as_float, require_samples, train_outputs
from ood_lightning.scoring.api import FeatureModel, FitData, Outputs, Scorer


def fit_inverse_temperature(logits: Tensor, labels: Tensor, iters: int = 100) -> float:
    """β = 1/T minimising mean NLL(β) = mean[logsumexp(β l) − β l_y], to convergence.

    NLL is convex in β (a log-sum-exp of linear functions minus a linear one), with
    derivative mean(E_p[l] − l_y) and curvature mean(Var_p[l]) ≥ 0: damped Newton steps
    reach the optimum to float64 precision (where pytorch-ood stops L-BFGS after 50 steps).
    """
    lg = logits.double()
    y = labels.long().to(lg.device)
    ly = lg.gather(1, y[:, None])[:, 0]

    def nll(beta: float) -> float:
        return float((torch.logsumexp(beta * lg, -1) - beta * ly).mean())

    beta = 1.0
    for _ in range(iters):
        p = (beta * lg).softmax(-1)
        mean_l = (p * lg).sum(-1)
        grad = float((mean_l - ly).mean())
        curv = float((p * (lg - mean_l[:, None]) ** 2).sum(-1).mean())
        if curv <= 0:
            break
        step = grad / curv
        new, f0 = beta - step, nll(beta)
        while (new <= 0 or nll(new) > f0) and abs(step) > 1e-15 * max(beta, 1.0):
            step /= 2
            new = beta - step
        if new <= 0 or abs(step) <= 1e-15 * max(beta, 1.0):
            break
        beta = new
        if abs(step) < 1e-12 * beta:
            break
    return beta


class TemperatureScaling(Scorer):
    """Score = max_c softmax(logits / T)_c, T = argmin NLL on labelled ID data.

    Guo et al. fit T on a held-out validation set: ``FitData.val`` is used when the
    evaluation provides it, else ``FitData.train`` (training logits are over-confident,
    so T fitted there is smaller); ``fitted_on`` records which. No hyperparameters.
    """

    card = Card(
        label="Temperature scaling",
        paper="Guo et al., ICML 2017",
        needs="logits; fit with labels",
        defaults=("T minimising NLL, solved to convergence (convex in 1/T), on `FitData.val` if given, else the "
                  "training fit set"),
    )

    def __init__(self) -> None:
        self.temperature: float | None = None
        self.fitted_on: str | None = None

    def fit(self, model: FeatureModel, data: FitData) -> TemperatureScaling:
        out, self.fitted_on = (data.val, "val") if data.val is not None else (train_outputs(data, "temperature_scaling"), "train")
        if out.labels is None:
            raise ConfigError("detectors.temperature_scaling fits T by NLL and needs class labels in the fit outputs")
        require_samples(len(out), 2, "temperature_scaling", None, "fitting a temperature")
        self.temperature = 1.0 / fit_inverse_temperature(as_float(out.logits), out.labels)
        return self

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        if self.temperature is None:
            raise RuntimeError("TemperatureScaling.score called before fit")
        return (as_float(outputs.logits) / self.temperature).softmax(-1).amax(-1)
