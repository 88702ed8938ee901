"""``method=dhm``: the Deep Hybrid Model (Cao & Zhang, CVPR 2022; revisited by Schlumbom &
Frank, TMLR).

A spectrally normalised feature extractor (``method.spectral_coeff``) gives features h;
a linear head classifies them and a residual flow models the density of their
normalised version ĥ (l∞ by default). Loss = CE + λ·NLL with NLL = −mean log p(ĥ); the
OOD score is log p(ĥ) (higher = ID). Choices where the papers are silent:

- The NLL gradient reaches the extractor too (joint training), as in both papers; this is
  what makes large λ collapse the features.
- Two optimisers with manual optimisation: SGD (+ MultiStepLR) for extractor and head,
  Adam for the flow, both stepped every batch, schedulers at epoch ends.
- The score uses the flow in eval mode: the exact log-det up to 1024 dimensions
  (``ResidualFlow.exact_max_dim``), a seeded series estimate beyond.
- The flow and its NLL run in float32 with autocast disabled (:meth:`DeepHybridModel.flow_terms`),
  also under ``trainer=gpu``'s bf16-mixed; the extractor and head keep the trainer's precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.methods.base import OODMethod
from ood_lightning.methods.dhm.collapse import CollapseMonitor
from ood_lightning.nn.feature_norm import NORMS, normalize_features
from ood_lightning.nn.modes import eval_mode
from ood_lightning.nn.spectral import BoundedBatchNorm, apply_spectral_norm, is_spectrally_bounded
from ood_lightning.scoring.api import Outputs, Scorer

#: λ when the config leaves it null: the seed paper's example value (docs/fidelity.md)
DEFAULT_LAMBDA = 3.5e-3


class DeepHybridModel(OODMethod):
    """``flow`` builds the density model for the feature dimension (``conf/method/flow/``);
    ``spectral_coeff`` bounds every conv/linear of the extractor to operator norm <= c and, with
    ``spectral_bn`` (default, as the authors' code), every BatchNorm's scale to <= c."""

    def __init__(self, backbone: nn.Module, num_classes: int, optimizer: Callable, flow_optimizer: Callable,
                 flow: Callable[[int], nn.Module], lambda_: float | None = None, spectral_coeff: float | None = 3.0,
                 spectral_bn: bool = True, feature_norm: str = "linf", head_input: str = "raw",
                 norm_log_coeff: float = 0.0, head: str = "linear", scheduler: Callable | None = None,
                 flow_scheduler: Callable | None = None, collapse_factor: float = 10.0,
                 monitor_ood: dict | None = None, score_batch_size: int = 512, inputs: dict | None = None):
        super().__init__(backbone, num_classes, optimizer, scheduler, inputs=inputs)
        self.automatic_optimization = False
        if spectral_coeff is not None:
            if is_spectrally_bounded(backbone):
                raise ConfigError("the backbone is already spectrally normalised (backbone.spectral_coeff): set the "
                                  "DHM's bound with method.spectral_coeff only")
            apply_spectral_norm(backbone, float(spectral_coeff), batchnorm=spectral_bn, exempt=backbone.unbounded_layers())
        self.spectral_coeff, self.spectral_bn = spectral_coeff, spectral_bn
        self.flow = flow(backbone.feature_dim)
        lambda_ = DEFAULT_LAMBDA if lambda_ is None else float(lambda_)
        if lambda_ < 0:
            raise ConfigError(f"lambda={lambda_}: the weight of the flow NLL must be >= 0")
        self.lambda_, self.feature_norm, self.collapse_factor = lambda_, feature_norm, collapse_factor
        if head_input not in ("raw", "normalized"):
            raise ConfigError(f"method.head_input must be 'raw' or 'normalized', got {head_input!r}")
        self.head_input, self.norm_log_coeff = head_input, float(norm_log_coeff)
        #: the head on normalised features is not a linear map of the penultimate features
        self.has_linear_head = head_input == "raw"
        if head not in ("linear", "softmax"):
            raise ConfigError(f"method.head must be 'linear' or 'softmax', got {head!r}")
        if head == "softmax":
            # the stripes study (§4.3): softmax of the features themselves is the classifier (logits = h);
            # kept an nn.Linear (identity, zero bias, frozen) so the linear-head detectors still apply
            if backbone.feature_dim != num_classes:
                raise ConfigError(f"method.head=softmax needs feature_dim == num_classes, got "
                                  f"{backbone.feature_dim} features for {num_classes} classes")
            with torch.no_grad():
                self.head.weight.copy_(torch.eye(num_classes))
                self.head.bias.zero_()
            self.head.requires_grad_(False)
        self.head_kind = head
        self.flow_optimizer_factory, self.flow_scheduler_factory = flow_optimizer, flow_scheduler
        #: AUROC of the DHM score against subsets of the OOD sets every validation epoch
        self.monitor_ood = dict(monitor_ood or {})
        self.score_batch_size = score_batch_size

    # -- model -------------------------------------------------------------------------------
    def density_input(self, features: Tensor) -> Tensor:
        return normalize_features(features, self.feature_norm)

    def classify(self, features: Tensor) -> Tensor:
        """The head on the raw features (ours) or on the normalised ones (``head_input=normalized``,
        the authors' ``common_features=True``)."""
        return self.head(self.density_input(features) if self.head_input == "normalized" else features)

    def flow_terms(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(log N(z; 0, I), log|det ∂z/∂ĥ|)`` [B] of the normalised features ĥ, in float32 with
        autocast off: under bf16-mixed the log-det series and slogdet would otherwise run on bf16
        Linear outputs (8 mantissa bits), far coarser than the NLL differences λ weighs."""
        with torch.autocast(features.device.type, enabled=False):
            h = features.float()
            z, logdet = self.flow(self.density_input(h))
            log_prior = -0.5 * (z.pow(2).sum(1) + z.shape[1] * math.log(2 * math.pi))
            if self.norm_log_coeff and self.feature_norm != "none":
                # the authors' code starts the flow's log-det at -log‖h‖∞ in their x->z convention
                # (logp = logpz - logdet), i.e. adds +log‖h‖ to log p: norm_log_coeff=1
                p = NORMS[self.feature_norm]
                logdet = logdet + self.norm_log_coeff * h.norm(p=p, dim=1).clamp_min(1e-8).log()
        return log_prior, logdet

    def losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        h = self.backbone(x)
        logits = self.classify(h)
        log_prior, logdet = self.flow_terms(h)
        nll = -(log_prior + logdet).mean()
        ce = F.cross_entropy(logits, y)
        return {"loss": ce + self.lambda_ * nll, "ce": ce, "nll": nll, "logdet": logdet.mean(),
                "acc": (logits.argmax(1) == y).float().mean()}

    # -- training ----------------------------------------------------------------------------
    def configure_optimizers(self):
        extractor = [p for n, p in self.named_parameters() if not n.startswith("flow.")]
        opts = [self.optimizer_factory(extractor), self.flow_optimizer_factory(self.flow.parameters())]
        scheds = [f(o) for f, o in ((self.scheduler_factory, opts[0]), (self.flow_scheduler_factory, opts[1]))
                  if f is not None]
        return opts, scheds

    def on_fit_start(self) -> None:
        # trainer.sync_batchnorm swaps every BatchNorm for a plain SyncBatchNorm: the bound would be gone
        if self.spectral_coeff is not None and self.spectral_bn and not any(
                isinstance(m, BoundedBatchNorm) for m in self.backbone.modules()) and any(
                isinstance(m, nn.SyncBatchNorm) for m in self.backbone.modules()):
            raise ConfigError("trainer.sync_batchnorm=true replaced the spectrally bounded BatchNorm layers; set "
                              "trainer.sync_batchnorm=false, or method.spectral_bn=false to leave BatchNorm free")

    def configure_callbacks(self):
        return [CollapseMonitor(key="train/logdet", factor=self.collapse_factor)]

    def training_step(self, batch, batch_idx):
        x, y = batch
        terms = self.losses(x, y)
        self.check_finite(terms["loss"], {k: v for k, v in terms.items() if k != "acc"})
        for opt in self.optimizers():
            opt.zero_grad(set_to_none=True)
        self.manual_backward(terms["loss"])
        for opt in self.optimizers():
            opt.step()
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, on_step=False, on_epoch=True,
                      prog_bar=True, batch_size=len(y))
        return terms["loss"]

    def on_train_epoch_end(self) -> None:
        scheds = self.lr_schedulers()
        for sched in scheds if isinstance(scheds, list) else [scheds] if scheds else []:
            sched.step()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        terms = self.losses(x, y)  # the flow re-enables autograd for its log-det where needed
        self.log_dict({f"val/{k}": v.detach() for k, v in terms.items()}, on_epoch=True, prog_bar=False,
                      batch_size=len(y), sync_dist=True)

    # -- scores ------------------------------------------------------------------------------
    @torch.no_grad()
    def density_scores(self, x: Tensor) -> Tensor:
        with eval_mode(self):
            return torch.cat([self.log_density(self.backbone(chunk)) for chunk in x.split(self.score_batch_size)])

    @torch.no_grad()
    def log_density(self, features: Tensor) -> Tensor:
        """log p(ĥ) of (un-normalised) features, in eval mode, batched on the model's device. Without
        autograd: with it, the exact log-det's Jacobians of a whole batch stay alive for a backward
        that never comes (22.8 GB for WRN-28-10's 640-d features at debug=fast, killed on 24 GiB)."""
        out = []
        for chunk in features.split(self.score_batch_size):
            log_prior, logdet = self.flow_terms(chunk.to(self.device))  # float32, autocast off
            out.append((log_prior + logdet).detach().cpu())
        return torch.cat(out)

    def monitor_scores(self, x: Tensor) -> Tensor:
        """The DHM score of inputs, followed per validation epoch against OOD subsets (paper Fig. 3)."""
        return self.density_scores(x)

    def scorers(self) -> dict[str, Scorer]:
        return {"dhm": FlowDensity()}


class FlowDensity(Scorer):
    """The DHM score: log p(ĥ) of the normalised penultimate features under the flow (higher = ID)."""

    needs_fit = False
    needs_classifier = False

    def score(self, model: DeepHybridModel, outputs: Outputs) -> Tensor:
        with eval_mode(model):  # the exact log-det and the bounds' stored vectors
            return model.log_density(outputs.features)
