"""The passes over a split: one forward pass that keeps everything scorers read
(:func:`extract`), and the own pass of a ``per_batch`` scorer (:func:`score_batches`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from rich.progress import Progress
from torch import Tensor

from ood_lightning.analysis.cost import human
from ood_lightning.data.device_loader import DeviceLoader
from ood_lightning.scoring.api import Outputs, Scorer, pool
from ood_lightning.scoring.ranks import SINGLE, Ranks

log = logging.getLogger(__name__)

#: a method's per-input values of the pass: (inputs, backbone outputs) -> {name: [B]}
PassValues = Callable[[Tensor, dict[str, Tensor]], dict[str, Tensor]]


@torch.no_grad()
def extract(model, loader, preprocess: Callable[[Tensor], Tensor], device: torch.device | str,
            progress: Progress | None = None, description: str = "extracting", ranks: Ranks = SINGLE,
            pass_values: PassValues | None = None) -> Outputs:
    """Run ``model`` over ``loader`` once and keep logits, pooled layers, labels and the method's
    ``pass_values`` (on CPU); with several ``ranks``, each runs its block and the blocks are gathered."""
    return ranks.run_sharded(loader, lambda ld: _extract(model, ld, preprocess, torch.device(device), progress,
                                                          description, pass_values), Outputs.cat)


def n_inputs(loader) -> int:
    """How many inputs a pass over ``loader`` sees."""
    return len(loader.labels) if isinstance(loader, DeviceLoader) else len(loader.dataset)


class StageLog:
    """One log line per stage, and one every ``every`` seconds while it runs (count, rate, ETA), so
    a long pass is visible when the output is a file, not a terminal (rich bars only draw on one)."""

    def __init__(self, description: str, total: int, every: float = 30.0) -> None:
        self.description, self.total, self.every = description, int(total), float(every)
        self.start = self.last = time.perf_counter()
        self.done = 0

    def advance(self, n: int) -> None:
        self.done += int(n)
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info("%s: %s/%s inputs (%.0f/s, ETA %s)", self.description, f"{self.done:,}", f"{self.total:,}", rate,
                     human((self.total - self.done) / max(rate, 1e-9)))

    def finish(self) -> float:
        seconds = time.perf_counter() - self.start
        log.info("%s: %s inputs in %s (%.0f/s)", self.description, f"{self.done:,}", human(seconds),
                 self.done / max(seconds, 1e-9))
        return seconds


def _extract(model, loader, preprocess, device, progress, description, pass_values) -> Outputs:
    model.eval()
    logits, labels, layers, extra = [], [], {}, {}
    task = progress.add_task(description, total=len(loader)) if progress else None
    stage = StageLog(description, n_inputs(loader))
    for x, y in loader:
        stage.advance(len(y))
        x = preprocess(x.to(device))
        feats = model.forward_features(x)
        logits.append(model.classify(feats["penultimate"]).float().cpu())
        labels.append(y.cpu())
        for name, value in feats.items():
            layers.setdefault(name, []).append(pool(value).float().cpu())
        for name, value in (pass_values(x, feats) if pass_values is not None else {}).items():
            extra.setdefault(name, []).append(value.detach().float().cpu())
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    stage.finish()
    layers = {k: torch.cat(v) for k, v in layers.items()}
    return Outputs(logits=torch.cat(logits), features=layers["penultimate"], layers=layers, labels=torch.cat(labels),
                   extra={k: torch.cat(v) for k, v in extra.items()})


def score_batches(scorer: Scorer, model, loader, preprocess, device: torch.device | str,
                  progress: Progress | None = None, description: str = "scoring", ranks: Ranks = SINGLE) -> Tensor:
    """A ``per_batch`` scorer's scores over ``loader`` (e.g. ODIN's perturbation), batch by batch."""
    return ranks.run_sharded(loader, lambda ld: _score_batches(scorer, model, ld, preprocess, torch.device(device),
                                                                progress, description), torch.cat)


def _score_batches(scorer, model, loader, preprocess, device, progress, description) -> Tensor:
    model.eval()
    scores = []
    task = progress.add_task(description, total=len(loader)) if progress else None
    stage = StageLog(description, n_inputs(loader))
    for x, _ in loader:
        scores.append(scorer.score_batch(model, preprocess(x.to(device))).detach().float().cpu())
        stage.advance(len(x))
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    stage.finish()
    return torch.cat(scores)
