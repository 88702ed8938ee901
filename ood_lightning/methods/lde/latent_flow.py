"""Latent density estimation (LDE; Cook, Lavoie & Waslander 2024): a normalizing flow on the
frozen classifier's penultimate features, scored in bits per dimension.

The recipe is deliberately post-hoc and short: optionally project the features with PCA,
L2-normalise them (which the paper found essential), add uniform dequantisation noise of
one bin width ε while training, and train the flow for about one epoch. The paper's point
is that *under*-training is what works: a flow trained to convergence ranks OOD worse, so
:meth:`LatentFlowDetector.fit_with_history` can record AUROC against training steps
(paper Fig. 5).

Bits per dimension treat features as discretised into bins of width ε, so a bin's mass is
≈ p(h)·ε^d and ``bpd = −log2 p(h)/d − log2 ε``; the score is ``−bpd`` (higher = ID).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError, NonFiniteLossError
from ood_lightning.core.progress import Progress, stage
from ood_lightning.evaluation.metrics import auroc
from ood_lightning.nn.flows.build import build_flow
from ood_lightning.nn.modes import eval_mode
from ood_lightning.scoring.api import FeatureModel, FitData, Outputs, Scorer, StateValue

log = logging.getLogger(__name__)

#: rows per forward pass when scoring (no gradients, so large batches are cheap)
SCORE_BATCH = 4096

FlowFactory = Callable[[int], nn.Module]


def _flow_label(flow: str | FlowFactory) -> str:
    """The flow's preset name: the string, or the ``name`` a config's partial ``build_flow`` carries."""
    if isinstance(flow, str):
        return flow
    if isinstance(flow, functools.partial) and "name" in flow.keywords:
        return str(flow.keywords["name"])
    return type(flow).__name__


class LatentFlowDetector(Scorer):
    """Score = −bits per dimension of a flow fitted post hoc to (PCA'd, L2-normalised) features.

    Args:
        flow: "glow", "realnvp", "maf", "residual", or a callable ``dim -> flow module``
            (anything with ``log_prob(h) -> [B]``).
        n_blocks, hidden: flow depth and conditioner width (``None``: the builder's default).
        normalize: "l2" projects features onto the unit sphere (LDE); "none" leaves them.
        pca_dim: project to this many principal components (scikit-learn) before normalising.
        epsilon: dequantisation bin width ε: training noise is U(−ε/2, ε/2) and bpd counts bins.
        lr, weight_decay, epochs, batch_size: Adam on shuffled minibatches of the ID training set.
        seed: seeds the flow's initialisation, the shuffling and the noise.
        device: "auto" (CUDA when available, else CPU) or a torch device string.
        eval_every: with ``fit_with_history``, record AUROC and mean bpd every this many steps.
        flow_kwargs: extra keyword arguments for the flow builder (e.g. ``batch_norm`` of realnvp).
        fit_augmented: fit on latents of *augmented* training images, one draw per image, as the paper
            does (§6.2: "obtained with dataset augmentation identical to the augmentations used to
            train the backbone"); ``False`` fits on the plain split, ``None`` on the run's
            (``evaluation.fit_augmented``). The other detectors of a run keep their own split.

    The fit is cacheable: the PCA, the flow's parameters and every buffer (persistent or not; the
    flow is rebuilt under ``seed`` as in :meth:`fit`, then overwritten) and ``history``.
    """

    fit_cacheable = True

    def __init__(
        self,
        flow: str | FlowFactory = "glow",
        n_blocks: int | None = None,
        hidden: int | None = None,
        normalize: str = "l2",
        pca_dim: int | None = None,
        epsilon: float = 1 / 1024,
        lr: float = 1e-4,
        epochs: int = 1,
        batch_size: int = 128,
        weight_decay: float = 0.0,
        seed: int = 0,
        device: str = "auto",
        eval_every: int | None = None,
        flow_kwargs: Mapping | None = None,
        fit_augmented: bool | None = True,
    ) -> None:
        if normalize not in ("l2", "none"):
            raise ConfigError(f"LatentFlowDetector normalize must be 'l2' or 'none', got {normalize!r}")
        if epsilon <= 0:
            raise ConfigError(f"LatentFlowDetector epsilon (bin width) must be > 0, got {epsilon}")
        if epochs < 0 or batch_size < 2:
            raise ConfigError(f"LatentFlowDetector needs epochs >= 0 and batch_size >= 2, got {epochs}, {batch_size}")
        if eval_every is not None and eval_every < 1:
            raise ConfigError(f"LatentFlowDetector eval_every must be >= 1 or None, got {eval_every}")
        self.flow_name = flow
        self.n_blocks = n_blocks
        self.hidden = hidden
        self.normalize = normalize
        self.pca_dim = pca_dim
        self.epsilon = float(epsilon)
        self.lr = float(lr)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.weight_decay = float(weight_decay)
        self.seed = int(seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" \
            else torch.device(device)
        self.eval_every = eval_every
        self.flow_kwargs = dict(flow_kwargs or {})
        self.fit_augmented = fit_augmented
        self.flow: nn.Module | None = None
        self._dim = 0
        self.pca_mean: Tensor | None = None
        self.pca_components: Tensor | None = None
        self.history: list[dict[str, float]] = []
        #: after a fit: its number of samples and optimiser steps (the paper's point is that steps matter)
        self.fit_samples = 0
        self.fit_steps = 0

    # -- features -> flow inputs -------------------------------------------------------------

    def _fit_pca(self, features: Tensor) -> None:
        self.pca_mean = self.pca_components = None
        if self.pca_dim is None:
            return
        n, d = features.shape
        if not 0 < self.pca_dim <= min(n, d):
            raise ConfigError(f"pca_dim={self.pca_dim} must be in [1, min(n_samples, feature dim) = {min(n, d)}]")
        pca = PCA(n_components=self.pca_dim, random_state=self.seed).fit(features.double().cpu().numpy())
        self.pca_mean = torch.as_tensor(pca.mean_, dtype=torch.float32)
        self.pca_components = torch.as_tensor(pca.components_, dtype=torch.float32)

    def prepare(self, features: Tensor) -> Tensor:
        """What the flow sees: features [N, D] -> (PCA'd, L2-normalised) [N, d] on the detector's device."""
        h = features.detach().float().to(self.device)
        if self.pca_components is not None:
            h = (h - self.pca_mean.to(self.device)) @ self.pca_components.to(self.device).T
        if self.normalize == "l2":
            h = F.normalize(h, dim=1)
        return h

    @property
    def dim(self) -> int:
        """Dimension d the flow models (bpd divides by it)."""
        if self.flow is None:
            raise RuntimeError("LatentFlowDetector is not fitted; call fit() first")
        return self._dim

    # -- density -----------------------------------------------------------------------------

    def _bpd_of_prepared(self, h: Tensor) -> Tensor:
        return -self.flow.log_prob(h) / (self._dim * math.log(2)) - math.log2(self.epsilon)

    @torch.no_grad()
    def bpd(self, features: Tensor) -> Tensor:
        """Bits per dimension [N] (CPU, float32) of raw features, without dequantisation noise."""
        if self.flow is None:
            raise RuntimeError("LatentFlowDetector is not fitted; call fit() first")
        with eval_mode(self.flow):
            out = [self._bpd_of_prepared(self.prepare(chunk)).float().cpu() for chunk in features.split(SCORE_BATCH)]
        return torch.cat(out) if out else torch.empty(0)

    def score(self, model: FeatureModel, outputs: Outputs) -> Tensor:
        return -self.bpd(outputs.features)

    def setting(self) -> dict[str, object]:
        return {"flow": _flow_label(self.flow_name), "normalize": self.normalize, "pca_dim": self.pca_dim, "epochs": self.epochs,
                "fit_steps": self.fit_steps}

    def fit_state(self) -> dict[str, StateValue]:
        if self.flow is None:
            raise RuntimeError("LatentFlowDetector is not fitted; call fit() first")
        state: dict[str, StateValue] = {"dim": self._dim, "history": self.history,
                                        **{f"flow/{k}": v for k, v in self.flow.state_dict().items()},
                                        **{f"buffer/{k}": v for k, v in self.flow.named_buffers()}}
        if self.pca_components is not None:
            state.update({"pca_mean": self.pca_mean, "pca_components": self.pca_components})
        return state

    def load_fit_state(self, state: dict[str, StateValue]) -> None:
        dim = int(state["dim"])
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # build as fit does, without touching anyone's stream
            torch.manual_seed(self.seed)
            flow = self._build(dim)
        flow.load_state_dict({k.removeprefix("flow/"): v for k, v in state.items() if k.startswith("flow/")})
        buffers = dict(flow.named_buffers())
        stored = {k.removeprefix("buffer/"): v for k, v in state.items() if k.startswith("buffer/")}
        if set(stored) != set(buffers):
            raise ValueError(f"flow buffers {sorted(stored)} differ from the built flow's {sorted(buffers)}")
        with torch.no_grad():
            for k, v in stored.items():
                buffers[k].copy_(v)
        flow.eval()
        self.flow, self._dim, self.history = flow, dim, [dict(r) for r in state["history"]]
        self.pca_mean, self.pca_components = state.get("pca_mean"), state.get("pca_components")

    # -- fitting -----------------------------------------------------------------------------

    def _build(self, dim: int) -> nn.Module:
        if callable(self.flow_name):
            return self.flow_name(dim).to(self.device)
        return build_flow(dim, self.flow_name, self.n_blocks, self.hidden, **self.flow_kwargs).to(self.device)

    def fit(self, model: FeatureModel | None, data: FitData) -> LatentFlowDetector:
        return self.fit_with_history(model, data.train)

    def fit_with_history(self, model: FeatureModel | None, train: Outputs | Tensor,
                         eval_sets: Mapping[str, Tensor | Outputs] | None = None,
                         progress: Progress | None = None) -> LatentFlowDetector:
        """Fit; with ``eval_every`` set, record ``self.history`` along the way (paper Fig. 5).

        ``eval_sets`` maps names to raw features; the first is the ID set, and every other set
        gets an AUROC against it (ID positive). Each history row holds ``step``, ``epoch``,
        ``train_bpd`` (mean over the steps since the last row, with noise), ``bpd/<name>`` and
        ``auroc/<name>``. Rows are taken at step 0, every ``eval_every`` steps and at the end.
        """
        features = train.features if isinstance(train, Outputs) else train
        sets = {k: (v.features if isinstance(v, Outputs) else v) for k, v in (eval_sets or {}).items()}
        # Seed initialisation and any global-RNG use inside the flow (e.g. stochastic log-det
        # estimators) without disturbing anyone else's random stream.
        cuda = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed)
            self._fit(features, sets, progress)
        return self

    def _fit(self, features: Tensor, sets: Mapping[str, Tensor], progress: Progress | None) -> None:
        self._fit_pca(features)
        x = self.prepare(features)
        self._dim = x.shape[1]
        self.flow = self._build(self._dim)
        self.flow.train()
        self.history = []

        n = len(x)
        cpu_gen = torch.Generator().manual_seed(self.seed)
        noise_gen = torch.Generator(device=self.device).manual_seed(self.seed)
        # A lone last sample would break batch statistics (ActNorm init, batch norm): skip it.
        per_epoch = n // self.batch_size + int(n % self.batch_size >= 2)
        total = per_epoch * self.epochs
        self.fit_samples, self.fit_steps = n, total
        # the paper's point is that the step count matters (under-training works): say it
        log.info("latent flow fit: %d samples, %d steps (%d epoch(s) x %d batches of %d)",
                 n, total, self.epochs, per_epoch, self.batch_size)
        params = [p for p in self.flow.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay) if params and total else None
        record = self.eval_every is not None
        losses: list[float] = []

        name = self.flow_name if isinstance(self.flow_name, str) else "latent"
        with stage(f"fitting {name} flow", total, "steps", progress=progress) as st:
            if record:
                self._record(0, 0, losses, sets)
            step = 0
            for epoch in range(self.epochs if opt else 0):
                perm = torch.randperm(n, generator=cpu_gen).to(self.device)
                for i in range(per_epoch):
                    batch = x[perm[i * self.batch_size:(i + 1) * self.batch_size]]
                    noise = torch.rand(batch.shape, generator=noise_gen, device=self.device) - 0.5
                    loss = self._bpd_of_prepared(batch + self.epsilon * noise).mean()
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(
                            f"latent {name} flow: bpd became {loss.item()} at step {step} (epoch {epoch}); "
                            f"lower lr (now {self.lr}) or use fewer n_blocks")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    losses.append(loss.item())
                    st.advance(1, epoch=epoch + 1, bpd=losses[-1])
                    if record and step % self.eval_every == 0:
                        self._record(step, epoch, losses, sets)
                        losses = []
            if record and losses:
                self._record(step, self.epochs - 1, losses, sets)
        self.flow.eval()

    def _record(self, step: int, epoch: int, losses: list[float], sets: Mapping[str, Tensor]) -> None:
        row: dict[str, float] = {"step": step, "epoch": epoch,
                                 "train_bpd": sum(losses) / len(losses) if losses else float("nan")}
        scores = {}
        for set_name, feats in sets.items():
            bpd = self.bpd(feats)
            row[f"bpd/{set_name}"] = bpd.mean().item()
            scores[set_name] = -bpd
        if scores:
            id_name, *ood_names = scores
            for set_name in ood_names:
                row[f"auroc/{set_name}"] = auroc(scores[id_name].double().numpy(), scores[set_name].double().numpy())
        self.history.append(row)
