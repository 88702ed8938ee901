"""ViM (Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022):
the feature's norm off the ID principal subspace, as a virtual logit against the energy."""

from __future__ import annotations

import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors.card import Card
from ood_lightning.detectors.energy import energy_score
from ood_lightning.detectors.fit_checks import as_float, require_samples, train_outputs
from ood_lightning.detectors.head import linear_head
from ood_lightning.scoring.api import FeatureModel, FitData, Outputs, Scorer, StateValue


def default_dim(feature_dim: int) -> int:
    """The principal dimension d: the authors' benchmark.py uses 1000 for D >= 2048 and 512
    otherwise (their models have D = 2048 or ViT's 768); below 768, 512 is impossible or
    leaves almost no residual, so D/2, as OpenOOD's 256 for ResNet-18's 512-d features."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


class ViM(Scorer):
    """Score = logsumexp(logits) − α ‖(f − u) R‖₂ (higher = ID).

    Fit on ID training features: origin u = −W⁺b (pseudo-inverse of the linear head),
    covariance of f − u (divided by N, uncentred about u, as the reference code),
    R = eigenvectors of its D − d *smallest* eigenvalues (the residual of the top-d
    principal subspace), and α = mean(max logit) / mean(‖(f − u) R‖) on the fit set.
    The paper's score is the softmax probability of the virtual logit (OOD-high); this
    is minus its log-odds, the reference code's ranking. ``dim`` = d (``"auto"``: see
    :func:`default_dim`); needs a linear head (model.head).
    """

    card = Card(
        label="ViM",
        paper="Wang et al., CVPR 2022",
        needs="features + logits, *head*; fit",
        defaults=("d = 1000 if D ≥ 2048, 512 if D ≥ 768 (authors' `benchmark.py`), else D/2 (OpenOOD's 256 for "
                  "ResNet-18); α from the fit set as in the paper"),
    )

    needs_linear_head = True
    #: an eigendecomposition of a D×D matrix: cheap, but cached with the rest (three values)
    fit_cacheable = True

    def __init__(self, dim: int | str = "auto") -> None:
        if dim != "auto" and (isinstance(dim, str) or int(dim) != dim or dim < 1):
            raise ConfigError(f"detectors.vim.dim must be 'auto' or an integer >= 1, got {dim!r}")
        self.dim = dim
        self.origin: Tensor | None = None
        self.residual: Tensor | None = None
        self.alpha: float | None = None

    def fit(self, model: FeatureModel, data: FitData) -> ViM:
        train = train_outputs(data, "vim")
        w, b = linear_head(model, "vim", train.features)
        f = as_float(train.features).double()
        d_feat = f.shape[1]
        d = default_dim(d_feat) if self.dim == "auto" else int(self.dim)
        if not 1 <= d < d_feat:
            raise ConfigError(f"detectors.vim.dim must be in [1, {d_feat - 1}] for {d_feat}-d features, got {d}")
        require_samples(len(f), d + 1, "vim", "dim", f"a {d}-d principal subspace")
        w, b = w.to(f.device).double(), b.to(f.device).double()
        self.origin = -(torch.linalg.pinv(w) @ b)
        x = f - self.origin
        _, vecs = torch.linalg.eigh(x.T @ x / len(x))  # ascending eigenvalues
        self.residual = vecs[:, : d_feat - d]
        vlogit = (x @ self.residual).norm(dim=-1)
        self.alpha = float(as_float(train.logits).double().amax(-1).mean() / vlogit.mean())
        return self

    def fit_state(self) -> dict[str, StateValue]:
        if self.residual is None:
            raise RuntimeError("ViM is not fitted")
        return {"origin": self.origin, "residual": self.residual, "alpha": self.alpha}

    def load_fit_state(self, state: dict[str, StateValue]) -> None:
        origin, residual, alpha = state["origin"], state["residual"], float(state["alpha"])
        if residual.ndim != 2 or origin.shape != residual.shape[:1]:
            raise ValueError(f"origin {tuple(origin.shape)} and residual {tuple(residual.shape)} do not match")
        self.origin, self.residual, self.alpha = origin, residual, alpha

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        if self.residual is None:
            raise RuntimeError("ViM.score called before fit")
        f = as_float(outputs.features).double()
        vlogit = ((f - self.origin.to(f.device)) @ self.residual.to(f.device)).norm(dim=-1)
        return energy_score(outputs.logits.double()) - self.alpha * vlogit
