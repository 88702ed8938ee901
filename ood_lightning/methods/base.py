"""What every trained method shares: the scoring-facing API, optimisers from config,
and a guard that stops a run on a non-finite loss with a checkpoint to inspect."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import Sampler

from ood_lightning.core import rng_state
from ood_lightning.core.errors import NonFiniteLossError
from ood_lightning.methods.nonfinite import NonFinite, NonFiniteGuard
from ood_lightning.scoring.api import Results, Scorer

log = logging.getLogger(__name__)

#: the checkpoint entry holding the generators' states (``rng_state.collect``)
RNG_KEY = "ood_lightning_rng"


class OODMethod(L.LightningModule):
    """Backbone + classifier head; subclasses add losses, density heads and own scores.

    ``optimizer`` / ``scheduler`` are partials from Hydra (``_partial_: true``) taking
    the parameters / the optimiser, so every hyperparameter lives in the config.
    """

    #: False for post-hoc methods: train.py then loads a checkpoint and skips fitting
    trains_backbone: bool = True
    #: False for unsupervised methods (VAE): no accuracy or open-set F1 is reported
    has_classifier: bool = True
    #: ``classify`` is ``head``, an nn.Linear on the penultimate features (what ViM, DICE, fDBD and
    #: GradNorm read); False for methods whose classify does more (VMDLS, G-ODIN)
    has_linear_head: bool = True
    #: weight of the method's density term in its loss (DHM's λ); None for methods without one
    lambda_: float | None = None
    #: where ``evaluation.f1_threshold: auto`` takes the open-set macro-F1 threshold from: ``id_val``
    #: (held-out validation scores) or ``id_train`` (the fit set's scores; VMDLS's paper, §4 Remark 2)
    f1_threshold_split: str = "id_val"

    def __init__(self, backbone: nn.Module, num_classes: int, optimizer: Callable[..., torch.optim.Optimizer] | None,
                 scheduler: Callable[..., Any] | None = None, inputs: dict | None = None):
        super().__init__()
        #: preprocessing this method needs over the data config's (``method.inputs``: dequantize,
        #: mean/std, crop_padding, hflip); the run's assembly applies it to the data module
        self.input_overrides = dict(inputs or {})
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.run_config: dict | None = None  # the resolved Hydra config, stored in checkpoints
        #: host reads of the loss: every step (1) or every k steps (train.yaml ``nan_check_every``)
        self.nan_check_every = 1
        #: dtype of the evaluation passes' backbone forward under autocast (``evaluation.precision``;
        #: None = float32); set by ``assembly.runtime.apply_eval_speedups``
        self.eval_autocast: torch.dtype | None = None
        self._nonfinite_guard: NonFiniteGuard | None = None

    # -- what detectors call ---------------------------------------------------------------
    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        return self.backbone.forward_features(x)

    def classify(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.backbone(x))

    # -- what the evaluation calls (every member declared here; methods override) ------------
    #: the classifier head of a ``method=classifier`` checkpoint fits this method's head
    loads_classifier_head: bool = True

    def scorers(self) -> dict[str, Scorer]:
        """The method's own OOD scores (higher = ID), scored beside the configured detectors."""
        return {}

    #: what the evaluation pass computes, for its progress line (a VAE: "features + IWAE K=50")
    pass_label: str = "features"

    def pass_values(self, x: Tensor, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-input values computed in the one evaluation pass (``Outputs.extra``), from the
        preprocessed inputs and the backbone's outputs on them; e.g. a VAE's IWAE bound."""
        return {}

    def prepare_split(self, split: str, loader, preprocess: Callable[[Tensor], Tensor], device) -> None:
        """Called before each split's evaluation pass (e.g. a VAE re-estimating BatchNorm statistics)."""

    def report(self, run_dir: Path, results: Results, dm, device) -> dict:
        """A method's own report once the results are written (pictures, probes); its summary
        is merged into ``metrics.json``."""
        return {}

    #: ``{"sets": [names] | "all", "limit": n}``: follow :meth:`monitor_scores` per validation epoch
    monitor_ood: dict = {}

    def monitor_scores(self, x: Tensor) -> Tensor | None:
        """A score to follow during training (AUROC per validation epoch, ``analysis/ood_monitor.py``)."""
        return None

    def train_batch_sampler(self, labels: Tensor) -> Sampler | None:
        """The batches this method trains on (e.g. VMDLS's classes × examples); None = shuffled batches."""
        return None

    # -- training helpers ----------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "epoch"}}

    def check_finite(self, loss: Tensor, terms: dict[str, Tensor]) -> None:
        """Stop with the step, every loss term and a saved checkpoint when the loss is NaN/inf.

        Reads the loss on the host every ``nan_check_every`` steps (``methods/nonfinite.py``).
        """
        if self._nonfinite_guard is None or self._nonfinite_guard.every != self.nan_check_every:
            self._nonfinite_guard = NonFiniteGuard(self.nan_check_every)
        found = self._nonfinite_guard.check(loss, terms, self.current_epoch, self.global_step)
        if found is not None:
            self._stop_nonfinite(found)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        last = self._trainer is not None and batch_idx + 1 >= self.trainer.num_training_batches
        if last and self._nonfinite_guard is not None:
            found = self._nonfinite_guard.flush()
            if found is not None:
                self._stop_nonfinite(found)

    def _stop_nonfinite(self, found: NonFinite) -> None:
        values = ", ".join(f"{k}={v:.4g}" for k, v in found.terms.items())
        path = "not saved (no trainer)"
        if self._trainer is not None:
            ckpt_dir = Path(self.trainer.default_root_dir) / "checkpoints"
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            path = str(ckpt_dir / f"nonfinite-step{found.step}.ckpt")
            self.trainer.save_checkpoint(path)
        late = ""
        if found.steps_late:
            late = (f" (found {found.steps_late} steps later: nan_check_every={self.nan_check_every} reads the loss "
                    "on the host every that many steps; the checkpoint holds the weights after those steps, "
                    "nan_check_every=1 saves them before the bad update)")
        fix = "Lower the learning rate"
        if self.lambda_:  # the density term (e.g. a flow's NLL) is the usual culprit
            fix += f" or the weight of the density term (lambda={self.lambda_:g}, e.g. lambda={self.lambda_ / 10:g})"
        raise NonFiniteLossError(f"non-finite loss at epoch {found.epoch}, step {found.step}: {values}; "
                                 f"checkpoint saved to {path}{late}. {fix}, or check the data.")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["ood_lightning_config"] = self.run_config
        # a resumed run continues every random stream (noise, augmentation, sampling) bitwise
        checkpoint[RNG_KEY] = rng_state.collect()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if RNG_KEY in checkpoint:  # older checkpoints resume with the seed's fresh streams
            rng_state.restore(checkpoint[RNG_KEY])
