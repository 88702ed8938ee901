"""The evaluation run: fit detectors on ID training outputs, score ID test and every OOD
set, compute every metric, and write ``metrics.json``, ``scores.npz`` and plots.

One forward pass per split feeds every output-based detector; only detectors that need
the inputs (ODIN) make their own pass.
"""

from __future__ import annotations

import json
import logging
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor

from ood_lightning.data.datamodule import OODDataModule
from ood_lightning.detectors.base import Detector, Outputs
from ood_lightning.evaluation import metrics as M
from ood_lightning.evaluation.feature_cache import FeatureCache, model_fingerprint
from ood_lightning.evaluation.outputs import across_ranks, extract, map_across_ranks, rank_and_world, score_inputs
from ood_lightning.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

#: the metrics shown in the printed table (every metric goes to metrics.json)
TABLE_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "autc", "macro_f1")


@dataclass
class Evaluation:
    """Scores per detector and split, the ID outputs metrics need, and the metrics."""

    scores: dict[str, dict[str, Tensor]]
    preds: dict[str, Tensor]
    id_test_labels: Tensor
    num_classes: int
    metrics: dict = field(default_factory=dict)
    has_classifier: bool = True
    #: every split's outputs of the one forward pass (methods' own reports, e.g. a VAE's)
    outputs: dict[str, Outputs] = field(default_factory=dict, repr=False)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, disable=rank_and_world()[0] != 0)


def score_everything(model, dm: OODDataModule, detectors: dict[str, Detector], device: torch.device | str = "cpu",
                     fit_limit: int | None = None, cache: FeatureCache | None = None,
                     fit_augmented: bool = False, distributed: bool = False) -> Evaluation:
    """Fit ``detectors`` on ID training data and score ``id_val``, ``id_test`` and every OOD set.

    With a ``cache`` (post-hoc runs on a fixed checkpoint) every split's outputs are read
    from disk when a previous run stored them, so the backbone runs at most once per split.
    ``fit_augmented`` fits detectors on features of augmented training images (the
    backbone's own training augmentation), as LDE offers.

    ``distributed=True`` (every rank of an initialised process group calls this, DDP): each
    rank runs the forward passes (and the method's own per-sample scores) on its block of
    every split and the results are gathered from all ranks before detectors and metrics, so
    every rank returns the same full :class:`Evaluation` as one process would.
    """
    with across_ranks(distributed):
        return _score_everything(model, dm, detectors, device, fit_limit, cache, fit_augmented)


def _score_everything(model, dm: OODDataModule, detectors: dict[str, Detector], device, fit_limit, cache,
                      fit_augmented) -> Evaluation:
    device = torch.device(device)
    model = model.to(device).eval()
    if detectors and not getattr(model, "has_classifier", True):
        log.warning("skipping detectors %s: they score a classifier's logits or features, and %s has no "
                    "classifier (its own scores are reported); pass detectors=none to silence this",
                    sorted(detectors), type(model).__name__)
        detectors = {}
    dm.setup("test")
    preprocess = dm.preprocess.to(device)
    loaders = dm.eval_dataloaders()
    scores: dict[str, dict[str, Tensor]] = {}
    fingerprint = model_fingerprint(model) if cache is not None else None

    def outputs_of(split: str, loader, progress, limit=None, augment: bool = False) -> Outputs:
        # each split's pass draws from its own seeded stream, so stochastic scores (a VAE's
        # posterior samples) are the same whenever a checkpoint is scored, whatever ran before
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(zlib.crc32(split.encode()))
            return _outputs_of(split, loader, progress, limit, augment)

    def _outputs_of(split: str, loader, progress, limit, augment) -> Outputs:
        prep = (lambda x: preprocess(x, train=True)) if augment else preprocess
        prepare = getattr(model, "prepare_split", None)
        if prepare is not None:  # e.g. a VAE re-estimating BatchNorm statistics on this split
            prepare(split, loader, prep, device)
        if cache is None:
            return extract(model, loader, prep, device, progress, f"features: {split}")
        dataset, name, tag = dm.cache_key(split, limit)
        tag = f"{tag}-augmented" if augment else tag
        return cache.get_or_extract(model, split, loader, prep, device, dataset, name, tag,
                                    extract_fn=extract, progress=progress, fingerprint=fingerprint)

    with _progress() as progress:
        outs: dict[str, Outputs] = {}
        own_preds: dict[str, Tensor] = {}
        fit_own = getattr(model, "fit_ood_scores", None)  # e.g. VMDLS's class Gaussians
        if detectors or fit_own is not None:
            fit_out = outputs_of("id_train", dm.fit_dataloader(fit_limit), progress, fit_limit, fit_augmented)
            if fit_own is not None:
                fit_own(fit_out)
            for det in detectors.values():
                det.fit(model, fit_out)
            del fit_out
            _select_on_id_validation(detectors, model, dm, preprocess, device)
        for split, loader in loaders.items():
            outs[split] = outputs_of(split, loader, progress)
            own = map_across_ranks(model.ood_scores, outs[split]) if hasattr(model, "ood_scores") else {}
            for name, value in own.items():
                scores.setdefault(name, {})[split] = value.detach().float().cpu()
            if hasattr(model, "ood_predictions"):  # a method's own class prediction per score (VMDLS)
                for name, value in model.ood_predictions(outs[split]).items():
                    own_preds[f"{split}|{name}"] = value.cpu()
        for name, det in detectors.items():
            if getattr(det, "uses_ood_data", False):
                continue
            for split, loader in loaders.items():
                if det.needs_inputs:
                    value = score_inputs(det, model, loader, preprocess, device, progress, f"{name}: {split}")
                else:
                    value = det.score(model, outs[split])
                scores.setdefault(name, {})[split] = value.detach().float().cpu()
    preds = {split: o.logits.argmax(1) for split, o in outs.items()}
    preds.update(own_preds)
    for name, det in detectors.items():
        if getattr(det, "uses_ood_data", False):
            _score_tuned_on_ood(name, det, model, outs, scores, preds)
    return Evaluation(scores, preds, outs["id_test"].labels, dm.num_classes,
                      has_classifier=getattr(model, "has_classifier", True), outputs=outs)


def _score_tuned_on_ood(name: str, det: Detector, model, outs: dict[str, Outputs], scores: dict, preds: dict,
                        fraction: float = 0.1, max_tune: int = 1000) -> None:
    """Detectors that tune on OOD data (e.g. Mahalanobis with regression weights) get, per OOD
    set, ID validation outputs and a random tuning part of that set (10%, at most 1000); their
    scores for that set (``<split>|<ood>`` for the ID splits) cover only the rest."""
    for ood in [s for s in outs if s not in ("id_val", "id_test")]:
        n = len(outs[ood])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        n_tune = min(max_tune, max(1, int(fraction * n)))
        tune, rest = perm[:n_tune], perm[n_tune:].sort().values
        det.fit_ood(model, outs["id_val"], outs[ood].subset(tune))
        by_split = scores.setdefault(name, {})
        for split in ("id_val", "id_test"):
            by_split[f"{split}|{ood}"] = det.score(model, outs[split]).detach().float().cpu()
        by_split[ood] = det.score(model, outs[ood].subset(rest)).detach().float().cpu()
        preds[f"{ood}|{name}"] = preds[ood][rest]


def _select_on_id_validation(detectors: dict, model, dm: OODDataModule, preprocess, device, limit: int = 1000) -> None:
    """Detectors that tune a hyperparameter on ID validation inputs only (no OOD data),
    e.g. Generalized ODIN's perturbation size, do it here."""
    tuners = [d for d in detectors.values() if hasattr(d, "select_epsilon")]
    if not tuners:
        return
    x = preprocess(dm.val_set.images[:limit].to(device))
    for det in tuners:
        det.select_epsilon(model, x)


def compute_metrics(ev: Evaluation, tpr: float = 0.95, groups: dict[str, str] | None = None) -> dict:
    """Every metric per detector × OOD set (ID = positive class), plus ID test accuracy.

    macro-F1 is the open-set (C+1)-way score at the threshold that keeps ``tpr`` of ID
    *validation* data; group means (e.g. near / far) are added as ``mean_<group>``.
    """
    ood_sets = [s for s in next(iter(ev.scores.values()), {}) if s not in ("id_val", "id_test") and "|" not in s]
    accuracy = float((ev.preds["id_test"] == ev.id_test_labels).float().mean()) if ev.has_classifier else None
    result: dict = {"accuracy": accuracy, "num_classes": ev.num_classes, "results": {}}
    for det, by_split in ev.scores.items():
        rows = {}
        for ood in ood_sets:
            # detectors tuned per OOD set carry their own ID scores for it ("id_test|<ood>")
            id_test = by_split.get(f"id_test|{ood}", by_split.get("id_test"))
            threshold = M.threshold_at_tpr(by_split.get(f"id_val|{ood}", by_split.get("id_val")).numpy(), tpr)
            ood_preds = ev.preds.get(f"{ood}|{det}", ev.preds[ood])
            m = M.ood_metrics(id_test.numpy(), by_split[ood].numpy())
            if ev.has_classifier:
                m["macro_f1"] = M.open_set_macro_f1(ev.preds.get(f"id_test|{det}", ev.preds["id_test"]).numpy(),
                                                    ev.id_test_labels.numpy(),
                                                    id_test.numpy(), ood_preds.numpy(),
                                                    by_split[ood].numpy(), threshold, ev.num_classes)
            rows[ood] = m
        for group in sorted(set((groups or {}).values())):
            members = [s for s in ood_sets if (groups or {}).get(s) == group]
            if len(members) > 1:
                rows[f"mean_{group}"] = {k: float(np.mean([rows[s][k] for s in members])) for k in rows[members[0]]}
        result["results"][det] = rows
    ev.metrics = result
    return result


def write_metrics(run_dir: str | Path, ev: Evaluation, extra: dict | None = None) -> Path:
    """``metrics.json``: ``extra`` (run metadata, a method's report), then the metrics, which win a clash."""
    path = Path(run_dir) / "metrics.json"
    atomic_write_text(path, json.dumps({**(extra or {}), **ev.metrics}, indent=2))
    return path


def write_results(run_dir: str | Path, ev: Evaluation, extra: dict | None = None) -> Path:
    """``metrics.json`` + ``scores.npz`` + ``plots/scores.png`` in ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(run_dir, ev, extra)
    arrays = {f"{det}/{split}": s.numpy() for det, by in ev.scores.items() for split, s in by.items()}
    arrays.update({f"preds/{split}": p.numpy() for split, p in ev.preds.items()})
    arrays["labels/id_test"] = ev.id_test_labels.numpy()
    atomic_write(run_dir / "scores.npz", lambda tmp: np.savez_compressed(tmp, **arrays))
    from ood_lightning.evaluation.plots import score_histograms

    if ev.scores:  # detectors=none: accuracy only, nothing to plot
        score_histograms(ev.scores, run_dir / "plots" / "scores.png")
    return run_dir / "metrics.json"


def write_results_and_report(run_dir: str | Path, ev: Evaluation, meta: dict, model, dm, device) -> None:
    """The results first, so a method's failing ``after_scoring`` report (pictures, probes)
    loses nothing; then the report's summary merged into ``metrics.json``."""
    write_results(run_dir, ev, extra=meta)
    after = getattr(model, "after_scoring", None)
    if after is not None:  # e.g. a VAE: bits/dim, sample/reconstruction grids, ELBO components, latent probe
        report = after(run_dir, ev.outputs, dm, device) or {}
        if report:
            write_metrics(run_dir, ev, {**meta, **report})


def results_table(metrics: dict, title: str = "OOD detection (ID = positive; ×100)") -> Table:
    acc = metrics.get("accuracy")
    table = Table(title=title + (f"   ID accuracy {100 * acc:.2f}%" if acc is not None else ""))
    table.add_column("detector", overflow="fold")
    table.add_column("OOD set", overflow="fold")
    shown = [k for k in TABLE_METRICS if any(k in m for rows in metrics["results"].values() for m in rows.values())]
    for m in shown:
        table.add_column(m, justify="right", no_wrap=True, min_width=5)
    for det, rows in metrics["results"].items():
        for i, (ood, m) in enumerate(rows.items()):
            table.add_row(det if i == 0 else "", ood, *(f"{100 * m[k]:.1f}" if k in m else "-" for k in shown),
                          end_section=i == len(rows) - 1)
    return table


def wide_console() -> Console:
    """The terminal's width on a terminal; 120 columns in logs and pipes rather than rich's 80."""
    return Console() if sys.stdout.isatty() else Console(width=120)


def print_results(metrics: dict, console: Console | None = None) -> None:
    console = console or wide_console()
    if not any(metrics.get("results", {}).values()):
        acc = metrics.get("accuracy")
        head = f"ID accuracy {100 * acc:.2f}%; " if acc is not None else ""
        console.print(f"{head}no OOD scores: no OOD sets or no detectors configured (ood=none / detectors=none)")
        return
    console.print(results_table(metrics))
