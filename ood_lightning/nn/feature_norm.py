"""Feature normalisation before a density head: none, l1, l2 or l∞ (DHM's default).

Dividing by a norm bounds the features the flow sees, which keeps the flow's task well
posed while the extractor moves. l∞ is Schlumbom & Frank's choice (§3: a step Cao & Zhang
do not specify, found vital; §4.5 compares the norms); their code divides the pooled
features by max|h| (``F.normalize(p=inf)``).
"""

from __future__ import annotations

from torch import Tensor

from ood_lightning.core.errors import ConfigError

NORMS = {"none": None, "l1": 1, "l2": 2, "linf": float("inf")}


def normalize_features(h: Tensor, kind: str = "linf", eps: float = 1e-8) -> Tensor:
    if kind not in NORMS:
        raise ConfigError(f"unknown feature normalisation {kind!r}; choose one of {list(NORMS)}")
    p = NORMS[kind]
    return h if p is None else h / h.norm(p=p, dim=1, keepdim=True).clamp_min(eps)
