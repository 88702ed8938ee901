"""The evaluation loop: fit every scorer once, score ``id_val``, ``id_test`` and every OOD set.

One forward pass per split feeds every output-based scorer; a ``per_batch`` scorer (ODIN's
perturbation) makes its own pass. The method's own scorers (``model.scorers()``) and the
configured detectors run through the same code: nothing here asks what a scorer can do
except through the attributes :class:`~ood_lightning.scoring.api.Scorer` declares. ``model`` is a
:class:`~ood_lightning.methods.base.OODMethod`, typed as the ``LightningModule`` it is: methods sit
above scoring and import it, never the reverse.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Mapping
from functools import partial

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from ood_lightning.core.cost import human
from ood_lightning.core.progress import Progress, stage
from ood_lightning.data.datamodule import OODDataModule
from ood_lightning.scoring.api import ID_SPLITS, FitData, Key, Outputs, Results, Scorer
from ood_lightning.scoring.feature_cache import FeatureCache, model_fingerprint
from ood_lightning.scoring.fit_cache import FitCache, fit_data_identity, fit_key
from ood_lightning.scoring.passes import extract, n_inputs, score_batches
from ood_lightning.scoring.ranks import SINGLE, Ranks

log = logging.getLogger(__name__)

#: ID validation inputs handed to scorers that choose a hyperparameter without OOD data
VAL_INPUTS = 1000
#: scorers tuned on OOD data get this fraction of each OOD set (at most TUNE_MAX); metrics use the rest
TUNE_FRACTION, TUNE_MAX = 0.1, 1000
#: fits and scorings faster than this get no closing line (each fit has its own line already)
QUIET_UNDER_S = 1.0


def usable_scorers(model: LightningModule, detectors: dict[str, Scorer]) -> dict[str, Scorer]:
    """The method's own scorers, then the detectors (those that need a classifier only if it has one)."""
    if not model.has_classifier:
        skipped = sorted(n for n, d in detectors.items() if d.needs_classifier)
        if skipped:
            log.warning("skipping detectors %s: they score a classifier's logits or features, and %s has no "
                        "classifier (its own scores are reported); pass detectors=none to silence this",
                        skipped, type(model).__name__)
        detectors = {n: d for n, d in detectors.items() if not d.needs_classifier}
    if not model.has_linear_head:
        skipped = sorted(n for n, d in detectors.items() if d.needs_linear_head)
        if skipped:
            log.warning("skipping detectors %s: they read the weights of a linear classifier head, and %s's "
                        "classify is not one", skipped, type(model).__name__)
        detectors = {n: d for n, d in detectors.items() if not d.needs_linear_head}
    own = model.scorers()
    clash = sorted(set(own) & set(detectors))
    if clash:
        from ood_lightning.core.errors import ConfigError

        raise ConfigError(f"detectors {clash} have the names of the method's own scores; rename them "
                          f"(e.g. ~detectors.{clash[0]})")
    return {**own, **detectors}


def score_all(model: LightningModule, dm: OODDataModule, detectors: dict[str, Scorer], device: torch.device | str = "cpu",
              fit_limit: int | None = None, cache: FeatureCache | None = None, fit_augmented: bool = False,
              ranks: Ranks = SINGLE, train_scores: bool = False, fit_cache: FitCache | None = None,
              configs: Mapping[str, object] | None = None) -> Results:
    """Fit every scorer on ID data and score ``id_val``, ``id_test`` and every OOD set.

    With a ``cache`` (post-hoc runs on a fixed checkpoint) each split's outputs are read from
    disk when a previous run stored them. ``fit_augmented`` fits on features of augmented
    training images (LDE's option). ``train_scores`` also scores the fit set with every scorer
    scored from outputs and fitted once (not ``per_batch``, not ``tunes_on_ood``), for an open-set
    threshold on training scores (VMDLS). With several ``ranks`` (DDP) each rank runs its block of
    every pass and the blocks are gathered, so every rank returns the same full results.

    With a ``fit_cache``, every ``fit_cacheable`` scorer named in ``configs`` (its resolved config,
    part of the key) is restored from the cache when the same fit already ran, else fitted and stored
    (:mod:`~ood_lightning.scoring.fit_cache`); ``Results.fit_cache`` says which.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    scorers = usable_scorers(model, detectors)
    dm.setup("test")
    preprocess = dm.preprocess.to(device)
    loaders = dm.eval_dataloaders()
    fingerprint = model_fingerprint(model) if cache is not None else None

    extracted: set[str] = set()  # splits that ran a real pass, not a cache read: their rate may project the others

    def outputs_of(split: str, loader, progress, limit=None, augment: bool = False) -> Outputs:
        return split_outputs(model, dm, split, loader, preprocess, device, cache, fingerprint, progress, limit,
                             augment, ranks, on_extract=extracted.add)

    scores: dict[Key, Tensor] = {}
    predictions: dict[Key, Tensor] = {}
    timings: dict[str, float] = {}
    on_train: dict[str, Tensor] = {}
    selected: dict[str, dict[str, object]] = {}

    def timed(stage: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
        return out

    fit_loader = dm.fit_dataloader(fit_limit) if any(s.needs_fit for s in scorers.values()) else None
    fit_samples = None
    fit_sources: dict[str, str] = {}
    _log_plan(scorers, loaders, fit_loader)
    # bars on the main rank's terminal; progress lines otherwise (a log file, a pipe, other ranks)
    with Progress(bars=ranks.is_main) as progress:
        if fit_loader is not None:
            train = timed("features/id_train", outputs_of, "id_train", fit_loader, progress,
                          fit_limit, fit_augmented)
            fit_samples = len(train)
            fitting = [name for name, scorer in scorers.items() if scorer.needs_fit]
            log.info("fitting %d scorers on %d ID training inputs%s", len(fitting), len(train),
                     " (augmented)" if fit_augmented else "")
            if "id_train" in extracted:
                _log_projection(len(train) / max(timings["features/id_train"], 1e-9), scorers, loaders)
            data = FitData(train=train, val_inputs=preprocess(dm.val_set.images[:VAL_INPUTS].to(device)))
            identity: dict | None = None

            def data_identity() -> dict:  # content digests of the fit data, once per run
                nonlocal identity
                if identity is None:
                    feature_key = None if cache is None else [*dm.cache_key("id_train", fit_limit),
                                                              "augmented" if fit_augmented else "plain"]
                    identity = fit_data_identity(data, fingerprint or model_fingerprint(model), feature_key)
                return identity

            with progress.stage("fitting scorers", len(fitting), "scorers", QUIET_UNDER_S) as fits:
                for name, scorer in scorers.items():
                    cacheable = (fit_cache is not None and scorer.needs_fit and scorer.fit_cacheable
                                 and not scorer.tunes_on_ood and configs is not None and name in configs)
                    start, served = time.perf_counter(), False
                    if cacheable:
                        key, ingredients = fit_key(name, scorer, configs[name], data_identity())
                        served = fit_cache.load(name, key, scorer)
                    if not served:
                        if scorer.needs_fit:
                            log.info("fitting %s ...", name)
                        scorer.fit(model, data)
                        if cacheable and ranks.is_main:
                            fit_cache.store(name, key, scorer, ingredients)
                    timings[f"fit/{name}"] = time.perf_counter() - start
                    if scorer.needs_fit:
                        if fit_cache is not None:
                            fit_sources[name] = "cache" if served else "fitted" if cacheable else "not cacheable"
                        if served:
                            log.info("fit %s: from the fit cache (%s)", name, key[:16])
                        else:
                            log.info("fitted %s in %s", name, human(timings[f"fit/{name}"]))
                        fits.advance(1, last=name)
                    if chosen := scorer.selected():
                        selected[name] = chosen
                        log.info("%s chose %s", name, ", ".join(f"{k}={v}" for k, v in chosen.items()
                                                                 if not isinstance(v, dict)))
            if train_scores:
                for name, scorer in scorers.items():
                    if not (scorer.per_batch or scorer.tunes_on_ood):
                        on_train[name] = timed(f"score_train/{name}", ranks.map_outputs, partial(scorer.score, model),
                                               train).detach().float().cpu()
            if fit_cache is not None:
                hits = [n for n, src in fit_sources.items() if src == "cache"]
                stored = [n for n, src in fit_sources.items() if src == "fitted"]
                log.info("fit cache: %d of %d cacheable fits served from %s%s%s", len(hits), len(hits) + len(stored),
                         fit_cache.root, f" ({', '.join(hits)})" if hits else "",
                         f"; fitted and stored: {', '.join(stored)}" if stored else "")
            del data, train
        outs = {split: timed(f"features/{split}", outputs_of, split, loader, progress) for split, loader in loaders.items()}
        for name, scorer in scorers.items():
            if scorer.tunes_on_ood:
                continue
            start = time.perf_counter()
            with progress.stage(f"scoring {name}", sum(len(o) for o in outs.values()), quiet_under=QUIET_UNDER_S) as scoring:
                for split, loader in loaders.items():
                    if scorer.per_batch:
                        value = score_batches(scorer, model, loader, preprocess, device, progress, f"{name}: {split}",
                                              ranks)
                    else:
                        value = ranks.map_outputs(partial(scorer.score, model), outs[split])
                    key = Key(name, split)
                    scores[key] = value.detach().float().cpu()
                    predictions[key] = _predictions(scorer, model, outs[split])
                    scoring.advance(len(outs[split]))
            timings[f"score/{name}"] = time.perf_counter() - start
        for name, scorer in scorers.items():
            if scorer.tunes_on_ood:
                timed(f"fit+score/{name}", _score_tuned_on_ood, name, scorer, model, outs, scores, predictions,
                      progress)
    return Results(scores, predictions, outs["id_test"].labels, outs["id_test"].logits.argmax(1), dm.num_classes,
                   has_classifier=model.has_classifier, outputs=outs, timings=timings, train_scores=on_train,
                   fit_samples=fit_samples, fit_augmented=fit_augmented and fit_samples is not None,
                   selected=selected, fit_cache=fit_sources)


def split_outputs(model: LightningModule, dm: OODDataModule, split: str, loader, preprocess, device: torch.device,
                  cache: FeatureCache | None = None, fingerprint: str | None = None, progress: Progress | None = None,
                  limit: int | None = None, augment: bool = False, ranks: Ranks = SINGLE,
                  on_extract=None) -> Outputs:
    """One split's outputs: from ``cache`` when a previous run stored them, else one pass (then stored).

    Shared by :func:`score_all` and the study drivers (``sweeps/lde_tables.py``), so both read and
    write the same cache entries. ``augment`` passes the training augmentation (``fit_augmented``);
    ``on_extract(split)`` is called when a real pass runs. Each split's pass draws from its own
    seeded stream, so stochastic values (a VAE's posterior samples, the augmentation) are the same
    whenever a checkpoint is scored, whatever ran before.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(zlib.crc32(split.encode()))
        prep = (lambda x: preprocess(x, train=True)) if augment else preprocess
        model.prepare_split(split, loader, prep, device)

        def run(*args, **kwargs) -> Outputs:
            if on_extract is not None:
                on_extract(split)
            return extract(*args, ranks=ranks, pass_values=model.pass_values, autocast=model.eval_autocast, **kwargs)

        if cache is None:
            return run(model, loader, prep, device, progress, f"{model.pass_label}: {split}")
        dataset, name, tag = dm.cache_key(split, limit)
        tag = f"{tag}-augmented" if augment else tag
        tag = f"{tag}-{str(model.eval_autocast).removeprefix('torch.')}" if model.eval_autocast is not None else tag
        return cache.get_or_extract(model, split, loader, prep, device, dataset, name, tag,
                                    extract_fn=run, progress=progress, fingerprint=fingerprint)


#: forward-pass equivalents of one input of a per-batch scorer (a gradient and a second forward pass)
PER_BATCH_COST = 3


def _log_plan(scorers: dict[str, Scorer], loaders: dict, fit_loader) -> None:
    """The one line saying what the evaluation will do and how many passes that is."""
    sizes = {split: n_inputs(ld) for split, ld in loaders.items()}
    eval_inputs = sum(sizes.values())
    fit_inputs = n_inputs(fit_loader) if fit_loader is not None else 0
    per_batch = [n for n, s in scorers.items() if s.per_batch]
    n_ood = len([s for s in sizes if s not in ID_SPLITS])
    log.info("scoring %d OOD sets with %d scorers on %s inputs (%s to fit on, %s to score): one forward pass per "
             "split%s", n_ood, len(scorers), f"{fit_inputs + eval_inputs:,}", f"{fit_inputs:,}", f"{eval_inputs:,}",
             f", plus {len(per_batch)} per-batch scorer(s) with their own gradient passes ({', '.join(per_batch)}; "
             f"about {PER_BATCH_COST} forward passes per input each)" if per_batch else "")


def _log_projection(rate: float, scorers: dict[str, Scorer], loaders: dict) -> None:
    """After the first pass: the forward passes still to come at its measured rate (fits not included)."""
    eval_inputs = sum(n_inputs(ld) for ld in loaders.values())
    passes = eval_inputs * (1 + PER_BATCH_COST * sum(s.per_batch for s in scorers.values()))
    log.info("projected: %s for the remaining passes (%s forward-pass equivalents at the measured %.0f inputs/s; "
             "an estimate, scorer fits not included)", human(passes / max(rate, 1e-9)), f"{passes:,}", rate)


def _predictions(scorer: Scorer, model, outputs: Outputs) -> Tensor:
    own = scorer.predict(model, outputs)
    return (outputs.logits.argmax(1) if own is None else own).cpu()


def _score_tuned_on_ood(name: str, scorer: Scorer, model, outs: dict[str, Outputs], scores: dict,
                        predictions: dict, progress: Progress | None = None) -> None:
    """Per OOD set: fit on ID validation outputs and a seeded tuning part of that set; its
    scores for that set (keys ``tuned_for=<set>``) cover only the rest."""
    sets = [s for s in outs if s not in ID_SPLITS]
    with stage(f"fit+score {name}", len(sets), "OOD sets", progress, QUIET_UNDER_S) as st:
        for ood in sets:
            _tune_and_score(name, scorer, model, outs, ood, scores, predictions)
            st.advance(1, last=ood)


def _tune_and_score(name: str, scorer: Scorer, model, outs: dict[str, Outputs], ood: str, scores: dict,
                    predictions: dict) -> None:
    """One OOD set of :func:`_score_tuned_on_ood`."""
    n = len(outs[ood])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_tune = min(TUNE_MAX, max(1, int(TUNE_FRACTION * n)))
    tune, rest = perm[:n_tune], perm[n_tune:].sort().values
    scorer.fit(model, FitData(val=outs["id_val"], ood_tune=outs[ood].subset(tune)))
    for split, out in (("id_val", outs["id_val"]), ("id_test", outs["id_test"]), (ood, outs[ood].subset(rest))):
        key = Key(name, split, tuned_for=ood)
        scores[key] = scorer.score(model, out).detach().float().cpu()
        predictions[key] = _predictions(scorer, model, out)
