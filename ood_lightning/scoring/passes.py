"""The passes over a split: one forward pass that keeps everything scorers read
(:func:`extract`), and the own pass of a ``per_batch`` scorer (:func:`score_batches`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ood_lightning.core.progress import Progress, stage
from ood_lightning.data.device_loader import DeviceLoader
from ood_lightning.scoring.api import Outputs, Scorer, pool
from ood_lightning.scoring.ranks import SINGLE, Ranks

#: a method's per-input values of the pass: (inputs, backbone outputs) -> {name: [B]}
PassValues = Callable[[Tensor, dict[str, Tensor]], dict[str, Tensor]]


@torch.no_grad()
def extract(model, loader, preprocess: Callable[[Tensor], Tensor], device: torch.device | str,
            progress: Progress | None = None, description: str = "extracting", ranks: Ranks = SINGLE,
            pass_values: PassValues | None = None, autocast: torch.dtype | None = None) -> Outputs:
    """Run ``model`` over ``loader`` once and keep logits, pooled layers, labels and the method's
    ``pass_values`` (on CPU); with several ``ranks``, each runs its block and the blocks are gathered.
    ``autocast`` (e.g. ``torch.bfloat16``; ``evaluation.precision``) runs the backbone and head under
    autocast; every output is float32 all the same."""
    return ranks.run_sharded(loader, lambda ld: _extract(model, ld, preprocess, torch.device(device), progress,
                                                          description, pass_values, autocast), Outputs.cat)


def n_inputs(loader) -> int:
    """How many inputs a pass over ``loader`` sees."""
    return len(loader.labels) if isinstance(loader, DeviceLoader) else len(loader.dataset)


def _extract(model, loader, preprocess, device, progress, description, pass_values, dtype) -> Outputs:
    model.eval()
    logits, labels, layers, extra = [], [], {}, {}
    with stage(description, n_inputs(loader), progress=progress) as st:
        for x, y in loader:
            x = preprocess(x.to(device))
            # the backbone and head under autocast (evaluation.precision); everything read from their
            # outputs (pass_values: a flow's log-det, a VAE's bound; every scorer's fit) is float32
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                feats = model.forward_features(x)
                logit = model.classify(feats["penultimate"])
            feats = {name: value.float() for name, value in feats.items()}
            logits.append(logit.float().cpu())
            labels.append(y.cpu())
            for name, value in feats.items():
                layers.setdefault(name, []).append(pool(value).float().cpu())
            for name, value in (pass_values(x, feats) if pass_values is not None else {}).items():
                extra.setdefault(name, []).append(value.detach().float().cpu())
            st.advance(len(y))
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
    with stage(description, n_inputs(loader), progress=progress) as st:
        for x, _ in loader:
            scores.append(scorer.score_batch(model, preprocess(x.to(device))).detach().float().cpu())
            st.advance(len(x))
    return torch.cat(scores)
