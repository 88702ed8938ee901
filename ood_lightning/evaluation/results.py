"""From a :class:`~ood_lightning.scoring.api.Results` table to what a run leaves behind:
every metric (a pure function of the table), ``metrics.json``, ``scores.npz``, the score
histograms, and the printed table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ood_lightning.core.errors import ConfigError
from ood_lightning.core.io import atomic_write, atomic_write_text
from ood_lightning.evaluation import metrics as M
from ood_lightning.scoring.api import Key, Results

#: the metrics shown in the printed table (every metric goes to metrics.json)
TABLE_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "autc", "macro_f1")


#: where the open-set macro-F1 threshold comes from (``evaluation.f1_threshold``)
F1_THRESHOLD_SPLITS = ("id_val", "id_train")


def check_f1_threshold(split: str) -> str:
    """``split`` if it names a threshold split (``auto`` is resolved by the caller, from the method)."""
    if split not in F1_THRESHOLD_SPLITS:
        raise ConfigError(f"evaluation.f1_threshold must be auto or one of {F1_THRESHOLD_SPLITS}, got {split!r}")
    return split


def compute_metrics(results: Results, tpr: float = 0.95, groups: dict[str, str] | None = None,
                    f1_threshold: str = "id_val") -> dict:
    """Every metric per scorer × OOD set (ID = positive class), plus ID test accuracy.

    Each OOD key ``(scorer, set, tuned_for)`` is compared with the ID keys of the same scorer
    and ``tuned_for``. macro-F1 is the open-set (C+1)-way score at the threshold that keeps
    ``tpr`` of the ID scores of ``f1_threshold``: ``id_val`` (held-out validation) or ``id_train``
    (the fit set, ``results.train_scores``; a scorer without them, per-batch or tuned on OOD data,
    falls back to ``id_val``). ``f1_threshold`` in the output says which split each scorer used.
    Group means (e.g. near / far) are added as ``mean_<group>``.
    """
    check_f1_threshold(f1_threshold)
    s, p = results.scores, results.predictions
    accuracy = float((results.id_test_predictions == results.id_test_labels).float().mean()) \
        if results.has_classifier else None
    out: dict = {"accuracy": accuracy, "num_classes": results.num_classes, "results": {}}
    used: dict[str, str] = {}
    for scorer in results.scorers():
        rows = {}
        for key in [k for k in results.ood_keys() if k.scorer == scorer]:
            id_test, id_val = Key(scorer, "id_test", key.tuned_for), Key(scorer, "id_val", key.tuned_for)
            m = M.ood_metrics(s[id_test].numpy(), s[key].numpy())
            if results.has_classifier:
                on_train = f1_threshold == "id_train" and key.tuned_for is None and scorer in results.train_scores
                ref = results.train_scores[scorer] if on_train else s[id_val]
                used[scorer] = "id_train" if on_train else "id_val"
                threshold = M.threshold_at_tpr(ref.numpy(), tpr)
                m["macro_f1"] = M.open_set_macro_f1(p[id_test].numpy(), results.id_test_labels.numpy(),
                                                    s[id_test].numpy(), p[key].numpy(), s[key].numpy(),
                                                    threshold, results.num_classes)
            rows[key.split] = m
        for group in sorted(set((groups or {}).values())):
            members = [o for o in rows if (groups or {}).get(o) == group]
            if len(members) > 1:
                rows[f"mean_{group}"] = {k: float(np.mean([rows[o][k] for o in members])) for k in rows[members[0]]}
        out["results"][scorer] = rows
    if used:
        out["f1_threshold"] = {"tpr": tpr, "split": used}
    return out


def write_metrics(run_dir: str | Path, metrics: dict, extra: dict | None = None) -> Path:
    """``metrics.json``: ``extra`` (run metadata, a method's report), then the metrics, which win a clash."""
    path = Path(run_dir) / "metrics.json"
    atomic_write_text(path, json.dumps({**(extra or {}), **metrics}, indent=2))
    return path


def write_results(run_dir: str | Path, results: Results, metrics: dict, extra: dict | None = None) -> Path:
    """``metrics.json`` + ``scores.npz`` (``<scorer>/<split>[@tuned_for]``; the classifier's
    predictions as ``preds/<split>``, each key's as ``preds/<scorer>/<split>[@tuned_for]``, the fit set's
    scores of an ``id_train`` F1 threshold as ``fit/<scorer>``) +
    ``plots/scores.png`` in ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(run_dir, metrics, extra)
    arrays = {key.label(): v.numpy() for key, v in results.scores.items()}
    arrays.update({f"preds/{split}": o.logits.argmax(1).numpy() for split, o in results.outputs.items()})
    arrays.update({f"preds/{key.label()}": v.numpy() for key, v in results.predictions.items()})
    arrays["labels/id_test"] = results.id_test_labels.numpy()
    arrays.update({f"fit/{scorer}": v.numpy() for scorer, v in results.train_scores.items()})
    atomic_write(run_dir / "scores.npz", lambda tmp: np.savez_compressed(tmp, **arrays))
    from ood_lightning.evaluation.plots import roc_curves, score_histograms

    by_scorer = {}  # scorer -> split (split@tuned_for for a scorer tuned on each OOD set) -> scores
    for key, v in results.scores.items():
        if key.split != "id_val":
            by_scorer.setdefault(key.scorer, {})[key.split + (f"@{key.tuned_for}" if key.tuned_for else "")] = v
    if by_scorer:  # detectors=none: accuracy only, nothing to plot
        score_histograms(by_scorer, run_dir / "plots" / "scores.png")
        if results.ood_keys():
            roc_curves(by_scorer, run_dir / "plots" / "roc.png")
    return run_dir / "metrics.json"


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


#: the line above a smoke run's table (debug=fast)
SMOKE_NOTE = ("SMOKE RUN (debug=fast): a few batches of a subset, cut-down scoring; "
              "these numbers test the code, they are not results")


def print_results(metrics: dict, console: Console | None = None, smoke: bool = False) -> None:
    console = console or wide_console()
    if smoke:
        console.print(SMOKE_NOTE, style="bold", markup=False)
    if not any(metrics.get("results", {}).values()):
        acc = metrics.get("accuracy")
        head = f"ID accuracy {100 * acc:.2f}%; " if acc is not None else ""
        console.print(f"{head}no OOD scores: no OOD sets or no detectors configured (ood=none / detectors=none)")
        return
    console.print(results_table(metrics))
    f1 = metrics.get("f1_threshold")
    if f1:
        by = {}
        for scorer, split in f1["split"].items():
            by.setdefault(split, []).append(scorer)
        where = {"id_train": "ID training", "id_val": "ID validation"}
        console.print("macro_f1 threshold: keeps {:.0%} of the {}".format(
            f1["tpr"], "; ".join(f"{where[k]} scores ({', '.join(v)})" for k, v in by.items())))
