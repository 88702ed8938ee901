"""One forward pass per split: logits, penultimate and pooled layer features."""

from __future__ import annotations

from collections.abc import Callable

import torch
from rich.progress import Progress
from torch import Tensor
from torch.utils.data import DataLoader

from ood_lightning.detectors.base import Detector, Outputs, pool


@torch.no_grad()
def extract(model, loader: DataLoader, preprocess: Callable[[Tensor], Tensor], device: torch.device,
            progress: Progress | None = None, description: str = "extracting") -> Outputs:
    """Run ``model`` over ``loader`` once and keep everything detectors may need (on CPU)."""
    model.eval()
    logits, labels, layers, extra = [], [], {}, {}
    input_scores = getattr(model, "input_scores", None)
    task = progress.add_task(description, total=len(loader)) if progress else None
    for x, y in loader:
        x = preprocess(x.to(device))
        feats = model.forward_features(x)
        logits.append(model.classify(feats["penultimate"]).float().cpu())
        labels.append(y.cpu())
        for name, value in feats.items():
            layers.setdefault(name, []).append(pool(value).float().cpu())
        if input_scores is not None:  # method-specific per-input values (e.g. IWAE), same pass
            for name, value in input_scores(x).items():
                extra.setdefault(name, []).append(value.detach().float().cpu())
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    layers = {k: torch.cat(v) for k, v in layers.items()}
    return Outputs(logits=torch.cat(logits), features=layers["penultimate"], layers=layers, labels=torch.cat(labels),
                   extra={k: torch.cat(v) for k, v in extra.items()})


def score_inputs(detector: Detector, model, loader: DataLoader, preprocess, device: torch.device,
                 progress: Progress | None = None, description: str = "scoring") -> Tensor:
    """Scores of a detector that needs the inputs (e.g. ODIN's perturbation), batch by batch."""
    model.eval()
    scores = []
    task = progress.add_task(description, total=len(loader)) if progress else None
    for x, _ in loader:
        scores.append(detector.score_inputs(model, preprocess(x.to(device))).detach().float().cpu())
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    return torch.cat(scores)
