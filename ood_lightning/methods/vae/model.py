"""``method=vae``: a convolutional VAE whose likelihood is the OOD score.

The model (Kingma & Welling, 2014): a DCGAN-style encoder (``backbone=dcgan``, the
framework's backbone slot) and a linear head give a diagonal Gaussian posterior
q(z|x) = N(mu, diag sigma^2); the prior is N(0, I); a decoder mirroring the encoder gives
p(x|z) with a selectable likelihood (:mod:`ood_lightning.nn.likelihoods`: Gaussian with
fixed sigma^2, discretised logistic, 256-way categorical). Training maximises the
beta-ELBO E_q log p(x|z) - beta KL(q || p) on uniformly dequantised inputs (the data config
sets ``dequantize: true`` and no normalisation, so inputs are in [0, 1]), with early
stopping on the validation ELBO (beta = 1) and the best epoch's weights restored.

Scoring (one evaluation pass, :meth:`VAE.pass_values`): the importance-weighted bound
(IWAE, Burda et al., 2016) log p(x) >= log 1/K sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x), for
each K in ``iwae_samples`` from one set of max(K) samples, batched over samples and
combined with a stable logsumexp; reported as bits/dim and, negated, as the OOD score
(``iwae_k<K>``; higher = more likely = ID). Beside it, the ELBO and its parts per input
(``elbo_rec`` = E_q log p(x|z), ``elbo_mu`` = -||mu||^2 / 2, ``elbo_logvar`` = sum log sigma^2 / 2,
``elbo_var`` = -sum (sigma^2 - 1) / 2), each as its additive share of the ELBO in -bits/dim,
so the four sum to ``elbo``. With ``adapt_bn`` = encoder | decoder | both the same scores
are computed again with that part's BatchNorm statistics taken from the test stream
(suffix ``_bn_<part>``; :mod:`ood_lightning.methods.vae.bn_adaptation`).

A likelihood that ranks an OOD set *above* the ID test set (AUROC < 0.5) is the
phenomenon this method exists to study (Nalisnick et al., 2019), not a bug.

The classifier slots of the framework are placeholders: ``has_classifier = False`` (no
accuracy or open-set F1), ``forward_features`` returns the latent mean as "penultimate"
(post-hoc detectors and the latent probe read it) and ``classify`` returns zeros [B, 1].
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.core.progress import stage
from ood_lightning.methods.base import OODMethod
from ood_lightning.methods.vae.bn_adaptation import (
    batch_norms,
    batch_statistics,
    bn_state,
    check_part,
    load_bn_state,
    reestimate_bn_stats,
)
from ood_lightning.nn.dcgan import DCGANDecoder, DCGANEncoder
from ood_lightning.nn.likelihoods import build_likelihood
from ood_lightning.nn.modes import eval_mode
from ood_lightning.scoring.api import Outputs, Results, Scorer
from ood_lightning.scoring.passes import n_inputs

log = logging.getLogger(__name__)

LOG_2PI = math.log(2 * math.pi)

#: the per-input values :meth:`VAE.pass_values` returns (before a ``_bn_<part>`` suffix)
COMPONENTS = ("elbo", "rec", "mu_sq", "logvar_sum", "var_m1_sum")


# -- the bound, independent of the networks (tested against a closed form) -----------------
def gaussian_kl_terms(mu: Tensor, logvar: Tensor) -> dict[str, Tensor]:
    """Per input: ||mu||^2, sum log sigma^2, sum (sigma^2 - 1) and
    KL(N(mu, sigma^2) || N(0, I)) = (||mu||^2 + sum (sigma^2 - 1) - sum log sigma^2) / 2."""
    mu_sq, logvar_sum = mu.pow(2).sum(1), logvar.sum(1)
    var_m1_sum = torch.expm1(logvar).sum(1)
    return {"mu_sq": mu_sq, "logvar_sum": logvar_sum, "var_m1_sum": var_m1_sum,
            "kl": 0.5 * (mu_sq + var_m1_sum - logvar_sum)}


def iwae_log_weights(x: Tensor, mu: Tensor, logvar: Tensor, log_px_given_z: Callable[[Tensor, Tensor], Tensor],
                     k: int, max_batch: int = 4096) -> tuple[Tensor, Tensor]:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) for k = 1..K, z_k ~ q(z|x).

    ``log_px_given_z(z [N, d], x [N, ...]) -> [N]``. Samples are decoded in chunks of at most
    ``max_batch`` latents (all B inputs x several samples per chunk). Returns
    ``(log_w [K, B], log_px [K, B])``.
    """
    b, d = mu.shape
    std = torch.exp(0.5 * logvar)
    per_chunk = max(1, int(max_batch) // max(1, b))
    log_ws, log_pxs = [], []
    for start in range(0, k, per_chunk):
        m = min(per_chunk, k - start)
        eps = torch.randn(m, b, d, device=mu.device, dtype=mu.dtype)
        z = mu + std * eps
        log_q = -0.5 * (eps.pow(2) + logvar + LOG_2PI).sum(-1)
        log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
        xs = x.unsqueeze(0).expand(m, *x.shape).reshape(m * b, *x.shape[1:])
        log_px = log_px_given_z(z.reshape(m * b, d), xs).view(m, b)
        log_ws.append(log_px + log_pz - log_q)
        log_pxs.append(log_px)
    return torch.cat(log_ws), torch.cat(log_pxs)


def iwae_bound(log_w: Tensor, k: int | None = None) -> Tensor:
    """log (1/K) sum_k w_k from the first K log-weights [K_max, B] -> [B] (stable logsumexp)."""
    log_w = log_w if k is None else log_w[:k]
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


# -- the method ----------------------------------------------------------------------------
class VAE(OODMethod):
    """VAE with a DCGAN encoder (the ``backbone``) and a mirrored decoder built here.

    ``num_classes`` is accepted (the framework passes it) and ignored. Hyperparameters:
    ``latent_dim``; ``likelihood`` (gaussian | logistic | categorical) and ``sigma2`` (the
    Gaussian's fixed variance on [0, 1] inputs) and ``output`` (its mean: sigmoid or linear decoder
    output); ``beta`` (KL weight in training);
    ``iwae_samples`` (the K of each IWAE score); ``decode_batch`` (latents per decoder pass
    when scoring: memory, not results); ``adapt_bn`` (none | encoder | decoder | both) and
    ``bn_stats`` (``batch``: each test batch normalised with its own statistics, inside the
    evaluation pass; ``stream``: running statistics re-estimated over each whole evaluation
    set before it is scored, via :meth:`prepare_split`); ``component_scores`` (report the
    ELBO parts as scores too); ``restore_best`` (load the weights of the epoch with the best
    validation ELBO when training ends); ``report`` (sizes of the pictures and probe).
    """

    has_classifier = False

    def __init__(self, backbone: nn.Module, num_classes: int, optimizer: Callable[..., torch.optim.Optimizer] | None,
                 scheduler: Callable[..., Any] | None = None, latent_dim: int = 128, likelihood: str = "gaussian",
                 sigma2: float = 0.1, output: str = "sigmoid", beta: float = 1.0, iwae_samples: Sequence[int] = (5, 50),
                 decode_batch: int = 4096,
                 adapt_bn: str = "encoder", bn_stats: str = "batch", component_scores: bool = True,
                 restore_best: bool = True, report: dict | None = None, max_iwae_samples: int | None = None,
                 early_stopping: dict | None = None, inputs: dict | None = None):
        super().__init__(backbone, num_classes, optimizer, scheduler, inputs=inputs)
        if not isinstance(backbone, DCGANEncoder):
            raise ConfigError(f"{type(self).__name__} builds its decoder as the mirror of a DCGAN encoder; {type(backbone).__name__} "
                              "is not one: use backbone=dcgan")
        self.head = None  # no classifier
        self.latent_dim = int(latent_dim)
        self.beta = float(beta)
        # evaluation.max_iwae_samples (debug=fast: cheap scoring) caps every K
        cap = None if max_iwae_samples is None else int(max_iwae_samples)
        self.iwae_samples = sorted({int(k) if cap is None else min(int(k), cap) for k in iwae_samples})
        self.early_stopping = None if early_stopping is None else dict(early_stopping)
        if not self.iwae_samples or self.iwae_samples[0] < 1:
            raise ConfigError(f"method.iwae_samples={list(iwae_samples)} needs at least one K >= 1")
        self.decode_batch = int(decode_batch)
        self.adapt_bn = check_part(adapt_bn)
        if bn_stats not in ("batch", "stream"):
            raise ConfigError(f"method.bn_stats={bn_stats!r} must be 'batch' or 'stream'")
        self.bn_stats = bn_stats
        self.component_scores = bool(component_scores)
        self.restore_best = bool(restore_best)
        self.report_options = {"samples": 64, "reconstructions": 16, "probe_test_size": 0.5, "probe_C": 1.0,
                               "probe_max_per_set": 5000, "walk_steps": 9, "walk_rows": 4, "probe_bn_train": True,
                               "probe_bn_train_batch": 512, "prior_bn_batches": 8, "prior_bn_batch": 256,
                               **dict(report or {})}
        self.likelihood = build_likelihood(likelihood, sigma2, output)
        self.likelihood_name = likelihood
        self.posterior = nn.Linear(backbone.feature_dim, 2 * self.latent_dim)
        self.decoder = DCGANDecoder.mirror(backbone, self.latent_dim,
                                           backbone.in_channels * self.likelihood.params_per_channel)
        self.image_shape = (backbone.in_channels, backbone.image_size, backbone.image_size)
        self.num_dims = int(np.prod(self.image_shape))
        self._stream_state = None  # BN statistics of the split being scored (bn_stats=stream)
        self._val_sum, self._val_n = 0.0, 0
        self._best: tuple[float, int, dict] | None = None  # (val ELBO, epoch, weights)
        self._best_elbo: float | None = None

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    # -- the model ---------------------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.posterior(self.backbone(x)).chunk(2, dim=1)
        return mu.float(), logvar.float().clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """Likelihood parameters [B, C * params_per_channel, H, W]."""
        return self.decoder(z)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def elbo_terms(self, x: Tensor) -> dict[str, Tensor]:
        """Single-sample ELBO pieces per input (nats): ``log_px``, ``kl``, ``elbo``, plus the
        posterior (``mu``, ``logvar``, ``z``) and decoder output (``params``)."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        params = self.decode(z)
        log_px = self.likelihood.log_prob(params, x)
        kl = gaussian_kl_terms(mu, logvar)["kl"]
        return {"log_px": log_px, "kl": kl, "elbo": log_px - kl, "mu": mu, "logvar": logvar, "z": z, "params": params}

    def bits_per_dim(self, log_likelihood: Tensor) -> Tensor:
        return -log_likelihood / (self.num_dims * math.log(2))

    # -- what detectors call -----------------------------------------------------------------
    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        return {"penultimate": self.encode(x)[0]}

    def classify(self, features: Tensor) -> Tensor:
        return features.new_zeros(features.shape[0], 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.forward_features(x)["penultimate"])

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x, _ = batch
        t = self.elbo_terms(x)
        # beta-ELBO in nats per dimension (the scale keeps learning rates image-size independent)
        loss = -(t["log_px"] - self.beta * t["kl"]).mean() / self.num_dims
        self.check_finite(loss, {"loss": loss, "log_px": t["log_px"].mean(), "kl": t["kl"].mean()})
        self.log_dict({"train/loss": loss, "train/bpd": self.bits_per_dim(t["elbo"]).mean(),
                       "train/kl": t["kl"].mean(), "train/log_px": t["log_px"].mean()},
                      prog_bar=True, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_n = 0.0, 0

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        t = self.elbo_terms(x)
        self._val_sum += float(t["elbo"].sum())
        self._val_n += len(x)
        self.log_dict({"val/elbo": t["elbo"].mean(), "val/bpd": self.bits_per_dim(t["elbo"]).mean(),
                       "val/kl": t["kl"].mean()}, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(x))

    def on_validation_epoch_end(self) -> None:
        if self._val_n == 0 or (self._trainer is not None and self.trainer.sanity_checking):
            return
        elbo = self._val_sum / self._val_n
        if math.isfinite(elbo) and (self._best_elbo is None or elbo > self._best_elbo):
            self._best_elbo = elbo
            if self.restore_best:
                state = {k: v.detach().to("cpu", copy=True) for k, v in self.state_dict().items()}
                self._best = (elbo, self.current_epoch, state)
            if self.early_stopping is not None and self._trainer is not None:
                self.trainer.save_checkpoint(Path(self.trainer.default_root_dir) / "checkpoints" / "best.ckpt")

    def configure_callbacks(self) -> list:
        """Early stopping on the validation ELBO (``method.early_stopping``; null: off). The epoch
        with the best validation ELBO is also saved as ``checkpoints/best.ckpt`` (validation end)."""
        if self.early_stopping is None:
            return []
        from lightning.pytorch.callbacks import EarlyStopping

        return [EarlyStopping(monitor="val/elbo", mode="max", check_finite=True, **self.early_stopping)]

    def on_fit_end(self) -> None:
        if self.restore_best and self._best is not None:
            elbo, epoch, state = self._best
            self.load_state_dict(state)
            log.info("restored the weights of epoch %d (best validation ELBO %.2f nats, %.4f bits/dim)", epoch, elbo,
                     -elbo / (self.num_dims * math.log(2)))
            self._best = None

    # -- scoring ---------------------------------------------------------------------------------
    def _adapted_bns(self) -> list:
        parts = {"encoder": (self.backbone,), "decoder": (self.decoder,), "both": (self.backbone, self.decoder)}
        return batch_norms(*parts.get(self.adapt_bn, ()))

    @contextmanager
    def adapted_bn(self) -> Iterator[None]:
        """Within the block the ``adapt_bn`` part normalises with test statistics (see ``bn_stats``)."""
        bns = self._adapted_bns()
        if self.adapt_bn == "none" or not bns:
            with nullcontext():
                yield
            return
        if self.bn_stats == "batch":
            with batch_statistics(bns):
                yield
            return
        if self._stream_state is None:
            raise ConfigError("method.bn_stats=stream re-estimates BatchNorm statistics per evaluation set through "
                              "model.prepare_split(...) before each split's pass (the evaluation loop does it); "
                              "outside it, call prepare_split first or use method.bn_stats=batch")
        saved = bn_state(bns)
        load_bn_state(bns, self._stream_state)
        try:
            yield
        finally:
            load_bn_state(bns, saved)

    @torch.no_grad()
    def prepare_split(self, split: str, loader, preprocess, device) -> None:
        """Before a split is scored (``bn_stats=stream``): re-estimate the ``adapt_bn`` part's
        running statistics over the whole split; the model's own statistics stay in place."""
        self._stream_state = None
        if self.adapt_bn == "none" or self.bn_stats != "stream":
            return
        enc, dec = batch_norms(self.backbone), batch_norms(self.decoder)
        source = bn_state(enc + dec)

        def images(part: str):
            with stage(f"BatchNorm statistics ({part}): {split}", n_inputs(loader)) as st:
                for x, _ in loader:
                    yield preprocess(x.to(device))
                    st.advance(len(x))

        if self.adapt_bn in ("encoder", "both"):
            reestimate_bn_stats(enc, images("encoder"), self.backbone)
        if self.adapt_bn in ("decoder", "both"):  # z ~ q(z|x), with the encoder adapted first for "both"
            reestimate_bn_stats(dec, images("decoder"), lambda x: self.decoder(self.reparameterize(*self.encode(x))))
        self._stream_state = bn_state(self._adapted_bns())
        load_bn_state(enc + dec, source)
        log.info("re-estimated %s BatchNorm statistics on %s", self.adapt_bn, split)

    def _likelihood_terms(self, x: Tensor, suffix: str = "") -> dict[str, Tensor]:
        mu, logvar = self.encode(x)
        log_w, log_px = iwae_log_weights(x, mu, logvar, lambda z, xs: self.likelihood.log_prob(self.decode(z), xs),
                                         self.iwae_samples[-1], self.decode_batch)
        out = {f"iwae_k{k}{suffix}": iwae_bound(log_w, k) for k in self.iwae_samples}
        terms = gaussian_kl_terms(mu, logvar)
        rec = log_px.mean(0)  # E_q log p(x|z), averaged over the same K samples
        out.update({f"elbo{suffix}": rec - terms["kl"], f"rec{suffix}": rec, f"mu_sq{suffix}": terms["mu_sq"],
                    f"logvar_sum{suffix}": terms["logvar_sum"], f"var_m1_sum{suffix}": terms["var_m1_sum"]})
        return out

    @torch.no_grad()
    def pass_values(self, x: Tensor, features: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Per input, in nats: ``iwae_k<K>``, ``elbo`` and its parts (see :data:`COMPONENTS`),
        then the same with the adapted BatchNorm statistics (suffix ``_bn_<part>``)."""
        out = self._likelihood_terms(x)
        if self.adapt_bn != "none":
            with self.adapted_bn():
                out.update(self._likelihood_terms(x, f"_bn_{self.adapt_bn}"))
        return out

    @property
    def pass_label(self) -> str:
        """The evaluation pass computes the IWAE bounds (the long part): say so in its progress."""
        return f"features + IWAE K={self.iwae_samples[-1]}"

    def suffixes(self) -> list[str]:
        return [""] + ([f"_bn_{self.adapt_bn}"] if self.adapt_bn != "none" else [])

    def scorers(self) -> dict[str, Scorer]:
        names = []
        for s in self.suffixes():
            names += [f"iwae_k{k}{s}" for k in self.iwae_samples] + [f"elbo{s}"]
            if self.component_scores:
                names += [f"elbo_rec{s}", f"elbo_mu{s}", f"elbo_logvar{s}", f"elbo_var{s}"]
        return {name: LikelihoodScore(name) for name in names}

    def own_scores(self, outputs) -> dict[str, Tensor]:
        """Higher = ID, all in -bits/dim: ``iwae_k<K>`` and ``elbo`` (the likelihood bounds) and,
        with ``component_scores``, the ELBO's additive parts ``elbo_rec``, ``elbo_mu``,
        ``elbo_logvar``, ``elbo_var`` (which sum to ``elbo``); each also with ``_bn_<part>``."""
        e, c = outputs.extra, 1.0 / (self.num_dims * math.log(2))
        scores = {}
        for s in self.suffixes():
            scores.update({f"iwae_k{k}{s}": e[f"iwae_k{k}{s}"] * c for k in self.iwae_samples})
            scores[f"elbo{s}"] = e[f"elbo{s}"] * c
            if self.component_scores:
                scores.update({f"elbo_rec{s}": e[f"rec{s}"] * c, f"elbo_mu{s}": -0.5 * e[f"mu_sq{s}"] * c,
                               f"elbo_logvar{s}": 0.5 * e[f"logvar_sum{s}"] * c,
                               f"elbo_var{s}": -0.5 * e[f"var_m1_sum{s}"] * c})
        return scores

    # -- pictures, bits/dim and the latent probe after scoring ----------------------------------------
    @contextmanager
    def prior_bn(self, batches: int = 8, batch_size: int = 256, seed: int = 0) -> Iterator[None]:
        """Thesis §3.3.5: within the block the decoder's BatchNorm running statistics are re-estimated on
        ``batches`` batches of prior samples z ~ N(0, I) (equal weight each), the inputs the decoder sees
        when sampling, rather than the training mix of posterior (and, for a GAN-VAE, prior) codes.
        Only the decoder's statistics change (the encoder is not run); on exit they are restored."""
        bns = batch_norms(self.decoder)
        saved = bn_state(bns)
        g = torch.Generator().manual_seed(seed)
        codes = [torch.randn(int(batch_size), self.latent_dim, generator=g).to(self.device)
                 for _ in range(int(batches))]
        reestimate_bn_stats(bns, codes, self.decoder)
        try:
            yield
        finally:
            load_bn_state(bns, saved)

    @torch.no_grad()
    def latent_means(self, batches: Iterable[Tensor], bn_train: bool = False) -> Tensor:
        """Posterior means of preprocessed ``batches`` [N, latent_dim]. ``bn_train``: the encoder's
        BatchNorm layers normalise each batch with its own statistics (BN in train mode: the thesis'
        "VAE (BN train)" row of Table 3.1); running statistics are left as they were."""
        with batch_statistics(batch_norms(self.backbone)) if bn_train else nullcontext():
            return torch.cat([self.encode(x.to(self.device))[0].float().cpu() for x in batches])

    @torch.no_grad()
    def sample_images(self, n: int, seed: int = 0) -> Tensor:
        """Mean images of p(x|z) for z ~ N(0, I) (the model in eval mode)."""
        z = torch.randn(n, self.latent_dim, generator=torch.Generator().manual_seed(seed))
        return self.likelihood.mean(self.decode(z.to(self.device))).cpu()

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean image of p(x|z = posterior mean)."""
        return self.likelihood.mean(self.decode(self.encode(x)[0])).cpu()

    @torch.no_grad()
    def decode_mean(self, z: Tensor) -> Tensor:
        return self.likelihood.mean(self.decode(z.to(self.device, torch.float32))).cpu()

    def report(self, out_dir: str | Path, results: Results, dm=None, device=None) -> dict:
        """Bits/dim per split, the ELBO-component plot, sample and reconstruction grids and the
        latent SVM probe per OOD set; writes ``generative.json`` and ``plots/*.png`` into
        ``out_dir`` and returns the summary (for ``metrics.json``)."""
        with eval_mode(self):
            return {"generative": self._generative_report(Path(out_dir), results.outputs, dm)}

    def _generative_report(self, out_dir: Path, outputs: dict, dm) -> dict[str, Any]:
        from ood_lightning.evaluation.plots_generative import (
            elbo_component_histograms,
            probe_distance_histograms,
            save_image_panels,
        )
        from ood_lightning.methods.vae.latent_probe import fit_latent_probe, walk_along_normal

        r = self.report_options
        plots = out_dir / "plots"
        nats_to_bpd = 1.0 / (self.num_dims * math.log(2))
        summary: dict[str, Any] = {"likelihood": self.likelihood_name, "bits_per_dim": {}}
        for split, o in outputs.items():
            summary["bits_per_dim"][split] = {k: float(-(v.double() * nats_to_bpd).mean()) for k, v in o.extra.items()
                                              if k.startswith(("iwae_k", "elbo"))}
        shown = [s for s in outputs if s != "id_val"]
        for s in self.suffixes():
            comps = {split: {"rec": outputs[split].extra[f"rec{s}"].numpy() / self.num_dims,
                             "mu_sq": outputs[split].extra[f"mu_sq{s}"].numpy(),
                             "logvar_sum": outputs[split].extra[f"logvar_sum{s}"].numpy(),
                             "kl": 0.5 * (outputs[split].extra[f"mu_sq{s}"] + outputs[split].extra[f"var_m1_sum{s}"]
                                          - outputs[split].extra[f"logvar_sum{s}"]).numpy()} for split in shown}
            where = f" (BatchNorm statistics of the {self.adapt_bn} from the test data)" if s else ""
            elbo_component_histograms(comps, plots / f"elbo_components{s}.png", f"ELBO components per input{where}")
        panels = {"samples z ~ N(0, I)": self.sample_images(int(r["samples"]))}
        if int(r["prior_bn_batches"]) > 0 and batch_norms(self.decoder):
            with self.prior_bn(int(r["prior_bn_batches"]), int(r["prior_bn_batch"])):
                panels["the same z, decoder BN statistics from prior samples (thesis 3.3.5)"] = \
                    self.sample_images(int(r["samples"]))
        save_image_panels(panels, plots / "samples.png",
                          title=f"VAE samples (mean of p(x|z), {self.likelihood_name} likelihood)")
        if dm is not None:
            sets = {"id_test": dm.test_set, **dm.ood_sets}
            panels = {}
            for split, data in sets.items():  # evenly spaced: packs may be sorted by class
                index = torch.linspace(0, len(data) - 1, min(int(r["reconstructions"]), len(data))).long()
                x = dm.preprocess(data.images[index].to(self.device))
                panels[f"{split}: inputs"] = x.cpu()
                panels[f"{split}: reconstructions"] = self.reconstruct(x)
            save_image_panels(panels, plots / "reconstructions.png", nrow=int(r["reconstructions"]))
        # the thesis' positives (Table 3.1): ID *training* latents (a fixed subset, no augmentation), and
        # an ID-train vs ID-test row; without the data module, ID test latents stand in (said so)
        positive, positives = "id_test", outputs["id_test"].features.numpy()
        if dm is not None:
            positive, positives = "id_train", self._training_latents(dm, int(r["probe_max_per_set"]))
        summary["latent_probe_positive"] = positive
        probes = {}
        against = [s for s in outputs if s not in ("id_val", "id_test")]
        for ood in (["id_test"] if positive == "id_train" else []) + against:
            try:
                probes[ood] = fit_latent_probe(positives, outputs[ood].features.numpy(),
                                               test_size=float(r["probe_test_size"]), C=float(r["probe_C"]),
                                               max_per_set=r["probe_max_per_set"])
            except ValueError as err:
                log.warning("latent probe for %s skipped: %s", ood, err)
        if probes:
            summary["latent_probe"] = {ood: p.summary() for ood, p in probes.items()}
            probe_distance_histograms(probes, plots / "latent_probe.png")
            steps, rows = int(r["walk_steps"]), int(r["walk_rows"])
            for ood, p in probes.items():
                span = 1.5 * float(np.quantile(np.abs(np.r_[p.distances_id, p.distances_ood]), 0.9))
                targets = np.linspace(-span, span, steps)
                panels = {}
                for name, z in ((f"{positive} latents moved along the normal ({ood} side -> ID side)", p.test_latents_id),
                                (f"{ood} latents moved along the normal ({ood} side -> ID side)", p.test_latents_ood)):
                    walk = walk_along_normal(z[:rows], p, targets)
                    panels[name] = self.decode_mean(torch.as_tensor(walk.reshape(-1, walk.shape[-1])))
                save_image_panels(panels, plots / f"latent_walk_{ood}.png", nrow=steps,
                                  title=f"decoded latents at signed distances {targets[0]:.2f} .. {targets[-1]:.2f}")
        if dm is not None and r["probe_bn_train"]:
            bn_probes = self._bn_train_probes(dm, against)
            if bn_probes:
                summary["latent_probe_bn_train"] = {ood: p.summary() for ood, p in bn_probes.items()}
                probe_distance_histograms(bn_probes, plots / "latent_probe_bn_train.png")
        (out_dir / "generative.json").write_text(json.dumps(summary, indent=2))
        self._log_summary(summary)
        return summary

    def _shuffled_batches(self, dm, data, limit: int, seed: int) -> Iterator[Tensor]:
        """Preprocessed batches (``report.probe_bn_train_batch``) of a fixed random subset of at most
        ``limit`` of ``data``, shuffled so that no batch is one class of a class-sorted pack."""
        index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[: int(limit)]
        for chunk in index.split(int(self.report_options["probe_bn_train_batch"])):
            yield dm.preprocess(data.images[chunk].to(self.device))

    def _bn_train_probes(self, dm, against: list[str]) -> dict:
        """Table 3.1's "BN train" rows: the same probes on latents taken with the encoder's BN in train
        mode (each batch normalised by its own statistics), ID training latents against ID test and
        each OOD set."""
        from ood_lightning.methods.vae.latent_probe import fit_latent_probe

        r = self.report_options
        limit = int(r["probe_max_per_set"])
        positives = self.latent_means(self._shuffled_batches(dm, dm.train_set, limit, 11), bn_train=True).numpy()
        sets = {"id_test": dm.test_set, **{name: dm.ood_sets[name] for name in against if name in dm.ood_sets}}
        probes = {}
        for i, (name, data) in enumerate(sets.items()):
            negatives = self.latent_means(self._shuffled_batches(dm, data, limit, 12 + i), bn_train=True).numpy()
            try:
                probes[name] = fit_latent_probe(positives, negatives, test_size=float(r["probe_test_size"]),
                                                C=float(r["probe_C"]), max_per_set=limit)
            except ValueError as err:
                log.warning("BN-train latent probe for %s skipped: %s", name, err)
        return probes

    @torch.no_grad()
    def _training_latents(self, dm, limit: int) -> np.ndarray:
        """Posterior means of (a fixed subset of at most ``limit``) ID training inputs, un-augmented."""
        parts = [self.encode(dm.preprocess(x.to(self.device)))[0].float().cpu() for x, _ in dm.fit_dataloader(limit)]
        return torch.cat(parts).numpy()

    @staticmethod
    def _log_summary(summary: dict) -> None:
        for split, by in summary["bits_per_dim"].items():
            log.info("bits/dim %s: %s", split, ", ".join(f"{k} {v:.3f}" for k, v in by.items() if "iwae" in k))
        for ood, p in summary.get("latent_probe", {}).items():
            log.info("latent SVM probe %s vs %s: positive %.3f / negative %.3f", summary.get("latent_probe_positive"), ood,
                     p["positive_accuracy"],
                     p["negative_accuracy"])


class LikelihoodScore(Scorer):
    """One of the VAE's scores in -bits/dim (an IWAE bound, the ELBO or one of its parts), read
    from the values of the evaluation pass (:meth:`VAE.pass_values`)."""

    needs_fit = False
    needs_classifier = False

    def __init__(self, name: str) -> None:
        self.name = name

    def score(self, model: VAE, outputs: Outputs) -> Tensor:
        return model.own_scores(outputs)[self.name]
