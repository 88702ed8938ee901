"""Figures and tables of one-parameter sweeps (DHM paper Fig. 3, Fig. 4 and Table 1).

    python evaluate.py run_dir=<multirun> plot=lambda           # val acc, val loss, AUROC per OOD set vs λ
    python evaluate.py run_dir=<multirun> plot=spectral_coeff   # AUROC, AUPR-in per OOD set vs c
    python evaluate.py run_dir=<multirun> compare=[dhm,msp]     # Table 1: detectors side by side

Only a run's own files are read, like :mod:`ood_lightning.evaluation.aggregate`:

* the swept value x: the run's ``.hydra/overrides.yaml`` (``lambda=3.5e-3``,
  ``method.spectral_coeff=3``), else the resolved ``.hydra/config.yaml`` (a value set by the
  experiment preset), else ``metrics.json`` (which stores ``lambda``);
* validation accuracy and loss (and the training log-det): the last epoch with a value in the
  run's ``csv/metrics.csv`` (``val/acc``, ``val/loss``, ``train/logdet``; ``logger=csv``, the default);
* AUROC / AUPR-in per detector and OOD set, and the seed: ``metrics.json``.

Runs with the same x (different seeds) give one point: the mean, with the sample standard
deviation as a shaded band (the style of :mod:`ood_lightning.evaluation.style`). Runs without usable results (a failed.json, a damaged or absent metrics.json)
are skipped; the summary lists them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import yaml

from ood_lightning.core.errors import ConfigError
from ood_lightning.evaluation.run_dir import JobIssue, job_dirs, read_metrics
from ood_lightning.evaluation.style import ID_COLOUR, PALETTE, mean_std, reference, save, styled

log = logging.getLogger(__name__)

#: sweep name -> config key of its x value
SWEEP_KEYS = {"lambda": "lambda", "spectral_coeff": "method.spectral_coeff"}
#: the paper's collapse threshold: λ = 3.59e-3 trained, 3.67e-3 collapsed (Fig. 3), measured with
#: a WRN-28-10 on CIFAR-10 (:data:`COLLAPSE_SETTING`); another model collapses elsewhere, if at all
COLLAPSE_THRESHOLD = (3.59e-3, 3.67e-3)
COLLAPSE_SETTING = {"data": "cifar10", "backbone": "wrn28_10"}
#: per-run values read from the last epoch of csv/metrics.csv (the log-det shows a collapse)
VAL_KEYS = {"val_acc": "val/acc", "val_loss": "val/loss", "train_logdet": "train/logdet"}


# -- reading runs ---------------------------------------------------------------------------------
def _yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.exists() else None


def _lookup(cfg, dotted: str):
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def _number(value) -> float | None:
    """A config value as a float: "3.5e-3" and "1e-3" (a string to YAML 1.1) alike; None otherwise."""
    if isinstance(value, str):
        value = yaml.safe_load(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def run_value(run: str | Path, key: str) -> float | None:
    """The value of config ``key`` (dotted) for one run: its overrides, else its resolved config,
    else its ``metrics.json``; None when unset (e.g. ``method.spectral_coeff=null``)."""
    run = Path(run)
    for override in _yaml(run / ".hydra" / "overrides.yaml") or []:
        name, _, value = str(override).lstrip("+~").partition("=")
        if name == key:
            return _number(value)
    cfg = _yaml(run / ".hydra" / "config.yaml")
    if cfg is not None:
        value = _lookup(cfg, key)
        if value is not None:
            return _number(value)
    metrics = run / "metrics.json"
    if metrics.exists():
        return _number(_lookup(json.loads(metrics.read_text()), key))
    return None


def last_epoch_values(csv_path: str | Path, keys: Sequence[str] = tuple(VAL_KEYS.values())) -> dict[str, float]:
    """The last logged value of each key in a Lightning ``CSVLogger`` file (rows in logging order)."""
    csv_path = Path(csv_path)
    values: dict[str, float] = {}
    if not csv_path.exists():
        return values
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            for k in keys:
                if row.get(k) not in (None, ""):
                    values[k] = float(row[k])
    return values


def collect_sweep(run_dir: str | Path, key: str) -> list[dict]:
    """One record per finished run under ``run_dir``: x, seed, val acc/loss, test accuracy, results."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} does not exist; pass the directory of a sweep (multirun)")
    records = []
    for run in job_dirs(run_dir):  # failed, damaged and unfinished jobs are listed by write_summary
        metrics = read_metrics(run)
        if isinstance(metrics, JobIssue):
            continue
        val = last_epoch_values(run / "csv" / "metrics.csv")
        records.append({"run": str(run), "x": run_value(run, key), "seed": metrics.get("seed"),
                        "data": metrics.get("data"), "backbone": metrics.get("backbone"),
                        "accuracy": metrics.get("accuracy"), "results": metrics["results"],
                        **{name: val.get(k, float("nan")) for name, k in VAL_KEYS.items()}})
    return records


def ood_sets(records: list[dict], detector: str) -> list[str]:
    """OOD sets of ``detector`` in first-seen order (group means ``mean_*`` last)."""
    seen: dict[str, None] = {}
    for r in records:
        seen.update(dict.fromkeys(r["results"].get(detector, {})))
    return sorted(seen, key=lambda s: s.startswith("mean_"))


def summarise(records: list[dict], value) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x values (sorted), mean, std (ddof=1; 0 for one run) and count of ``value(record)`` over seeds.

    Records whose x is None or whose value is missing/NaN are left out.
    """
    groups: dict[float, list[float]] = defaultdict(list)
    for r in records:
        v = value(r)
        if r["x"] is not None and v is not None and np.isfinite(v):
            groups[r["x"]].append(float(v))
    xs = np.array(sorted(groups))
    mean = np.array([np.mean(groups[x]) for x in xs])
    std = np.array([np.std(groups[x], ddof=1) if len(groups[x]) > 1 else 0.0 for x in xs])
    return xs, mean, std, np.array([len(groups[x]) for x in xs])


def _metric(detector: str, ood: str, metric: str):
    return lambda r: r["results"].get(detector, {}).get(ood, {}).get(metric)


# -- figures --------------------------------------------------------------------------------------
#: line styles of the detectors of one panel (colours: the OOD sets)
DETECTOR_STYLES = ("-", "--", ":", "-.")
#: the y axes of the per-run values, with units
VAL_LABELS = {"val_acc": "validation accuracy (fraction)", "val_loss": "validation loss CE + λ·NLL (nats)",
              "train_logdet": "training log-det, last epoch (nats)"}
METRIC_LABELS = {"auroc": "AUROC ×100 (ID = positive; 50 = chance)", "aupr_in": "AUPR-in ×100 (ID = positive)"}


def collapse_threshold(records: list[dict]) -> tuple[float, float] | None:
    """The paper's collapse threshold when every run has the paper's setting (data and backbone,
    from ``metrics.json``); None otherwise: a small model's curve says nothing about it."""
    same = all(r.get(k) == v for r in records for k, v in COLLAPSE_SETTING.items())
    return COLLAPSE_THRESHOLD if records and same else None


def _ood_panel(ax, records, detectors, metric: str) -> None:
    """Per detector (line style) and OOD set (colour): mean ± std over seeds ×100 against x."""
    sets = list(dict.fromkeys(o for det in detectors for o in ood_sets(records, det)))
    for i, det in enumerate(detectors):
        for ood in ood_sets(records, det):
            xs, mean, std, _ = summarise(records, _metric(det, ood, metric))
            if len(xs):
                mean_std(ax, xs, 100 * mean, 100 * std, label=f"{det}: {ood}",
                         color=PALETTE[sets.index(ood) % len(PALETTE)], linestyle=DETECTOR_STYLES[i % len(DETECTOR_STYLES)])
    ax.set_ylabel(METRIC_LABELS[metric])
    if metric == "auroc":
        reference(ax, y=50)


def _value_panel(ax, records, value, ylabel: str) -> None:
    """One quantity per run (black): mean ± std over seeds; a log y axis when it spans > 2 decades."""
    xs, mean, std, _ = summarise(records, value)
    mean_std(ax, xs, mean, std, color=ID_COLOUR)
    ax.set_ylabel(ylabel)
    if len(mean) and mean.min() > 0 and mean.max() > 100 * mean.min():
        ax.set_yscale("log")


def _title(records, x_label: str) -> str:
    n_seeds = max((n for n in summarise(records, lambda r: r["accuracy"] or 0.0)[3]), default=0)
    seeds = f"{n_seeds} seed" if n_seeds == 1 else f"up to {n_seeds} seeds"
    spread = "" if n_seeds == 1 else "; mean ± std (band) over seeds"
    return f"{len(records)} run{'s' if len(records) != 1 else ''}, {seeds} per {x_label}{spread}"


def _figure_legend(fig, ax) -> None:
    """The legend of ``ax``'s curves, once, to the right of the figure: it covers no panel."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", handlelength=3.5)


@styled
def lambda_figure(records: list[dict], detectors: Sequence[str] = ("dhm",),
                  threshold: tuple[float, float] | None = None):
    """The figure of :func:`plot_lambda` (unsaved, for inspection): four panels on a log λ axis;
    ``threshold`` (λ from, to) is drawn as a band."""
    fig, axes = plt.subplots(1, 4, figsize=(19, 3.8), layout="constrained")
    for ax, name in zip([axes[0], axes[1], axes[3]], VAL_LABELS):
        _value_panel(ax, records, lambda r, n=name: r[n], VAL_LABELS[name])
    _ood_panel(axes[2], records, detectors, "auroc")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("λ (weight of the flow's NLL; log scale)")
        if threshold is not None:
            ax.axvspan(*threshold, color="tab:red", alpha=0.4, linewidth=1, label="paper's collapse threshold"
                       if ax is axes[2] else None)
    _figure_legend(fig, axes[2])
    fig.suptitle(_title(records, "λ"))
    return fig


@styled
def spectral_figure(records: list[dict], detectors: Sequence[str] = ("dhm",)):
    """The figure of :func:`plot_spectral_coeff` (unsaved): test accuracy, AUROC, AUPR-in against c."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
    _value_panel(axes[0], records, lambda r: r["accuracy"], "test accuracy (fraction)")
    _ood_panel(axes[1], records, detectors, "auroc")
    _ood_panel(axes[2], records, detectors, "aupr_in")
    for ax in axes:
        ax.set_xlabel("spectral coefficient c (bound on each layer's Lipschitz constant)")
    _figure_legend(fig, axes[1])
    fig.suptitle(_title(records, "c"))
    return fig


def plot_lambda(run_dir: str | Path, out: str | Path | None = None, detectors: Sequence[str] = ("dhm",)) -> Path:
    """Paper Fig. 3: validation accuracy, validation loss and AUROC per OOD set against λ (log x),
    and the last epoch's training log-det (the collapse monitor's quantity: 0.12 -> 1113 in the paper).

    A red band marks the paper's collapse threshold (λ between 3.59e-3 and 3.67e-3) when every run has
    the paper's setting (:func:`collapse_threshold`). Axes whose
    values span more than two decades (the loss grows with λ·NLL) are drawn on a log scale.
    """
    records = [r for r in collect_sweep(run_dir, "lambda") if r["x"] is not None and r["x"] > 0]
    if not records:
        raise ConfigError(f"no finished runs with lambda > 0 under {run_dir} (log-scale x axis)")
    out = Path(out) if out else Path(run_dir) / "sweep_lambda.png"
    write_sweep_csv(records, "lambda", out.with_suffix(".csv"), detectors)
    return save(lambda_figure(records, detectors, collapse_threshold(records)), out)


def plot_spectral_coeff(run_dir: str | Path, out: str | Path | None = None,
                        detectors: Sequence[str] = ("dhm",)) -> Path:
    """Paper Fig. 4: test accuracy, AUROC and AUPR-in per OOD set against the spectral coefficient c."""
    records = collect_sweep(run_dir, SWEEP_KEYS["spectral_coeff"])
    skipped = sum(r["x"] is None for r in records)
    if skipped:
        log.warning("%d runs without a spectral coefficient (spectral_coeff=null) are left out", skipped)
    records = [r for r in records if r["x"] is not None]
    if not records:
        raise ConfigError(f"no finished runs with method.spectral_coeff set under {run_dir}")
    out = Path(out) if out else Path(run_dir) / "sweep_spectral_coeff.png"
    write_sweep_csv(records, "method.spectral_coeff", out.with_suffix(".csv"), detectors)
    return save(spectral_figure(records, detectors), out)


PLOTS = {"lambda": plot_lambda, "spectral_coeff": plot_spectral_coeff}


def plot_sweep(kind: str, run_dir: str | Path, detectors: Sequence[str] = ("dhm",)) -> Path:
    """``evaluate.py plot=<kind>``: the figure of a λ or spectral-coefficient sweep."""
    if kind not in PLOTS:
        raise ConfigError(f"unknown plot={kind!r}; choose one of {sorted(PLOTS)} (or null)")
    return PLOTS[kind](run_dir, detectors=detectors)


def write_sweep_csv(records: list[dict], key: str, path: Path, detectors: Sequence[str] = ("dhm",)) -> Path:
    """The numbers behind a sweep figure: one row per x value, mean/std/n of every plotted quantity."""
    columns = {name: (lambda r, n=name: r[n]) for name in VAL_KEYS} | {"test_acc": lambda r: r["accuracy"]}
    for det in detectors:
        for ood in ood_sets(records, det):
            for m in ("auroc", "aupr_in", "autc"):
                columns[f"{det}/{ood}/{m}"] = _metric(det, ood, m)
    table: dict[float, dict] = defaultdict(dict)
    for name, fn in columns.items():
        xs, mean, std, n = summarise(records, fn)
        for x, mu, sd, k in zip(xs, mean, std, n):
            table[x].update({f"{name}_mean": mu, f"{name}_std": sd, "n": max(k, table[x].get("n", 0))})
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [key, "n"] + [f"{c}_{s}" for c in columns for s in ("mean", "std")]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for x in sorted(table):
            writer.writerow({key: x, **table[x]})
    return path


# -- Table 1 --------------------------------------------------------------------------------------
def _fmt(row: dict, metric: str) -> str:
    """×100, mean ± std over seeds; a single run's value alone (one run has no spread)."""
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if row["n"] > 1 else "")


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def side_by_side(rows: list[dict], detectors: Sequence[str], metrics: Sequence[str] = ("auroc", "aupr_in", "autc"),
                 title: str = "") -> str:
    """Paper Table 1 from :func:`~ood_lightning.evaluation.aggregate.aggregate` rows: per setting, one
    line per OOD set, for each detector (in the given order) its metrics ×100 as mean ± std over
    seeds (detectors side by side: few columns however many OOD sets).

    AUROC and AUPR-in: higher is better; AuTC: lower is better. Settings are named as in
    ``summary.md`` (:func:`~ood_lightning.evaluation.aggregate.setting_legend`).
    """
    from ood_lightning.evaluation.aggregate import setting_legend

    found = sorted({r["detector"] for r in rows})
    wanted = [d for d in detectors if d in found]
    if not wanted:
        raise ConfigError(f"none of the detectors {list(detectors)} is in the runs; found {found}")
    if missing := [d for d in detectors if d not in found]:
        log.warning("compare: %s not in the runs (left out of the table); found %s", missing, found)
    legend = setting_legend(rows)
    out = [text for text in (f"## {title}\n" if title else "", legend.markdown()) if text]
    for group in dict.fromkeys(r["group"] for r in rows):
        sel = [r for r in rows if r["group"] == group]
        sets = list(dict.fromkeys(r["ood_set"] for r in sel if r["detector"] in wanted))
        n = max(r["n"] for r in sel)
        acc = next((r for r in sel if not math.isnan(r.get("accuracy_mean", math.nan))), None)
        acc_text = f", test accuracy {_fmt({**acc, 'n': n}, 'accuracy')}" if acc else ""
        name = legend.labels[group] if legend.several else "every run"
        out.append(f"**{name}** ({_seeds(n)}{acc_text})\n")
        head = ["OOD set"] + [f"{det} {m}" for det in wanted for m in metrics]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        by_key = {(r["detector"], r["ood_set"]): r for r in sel}
        for ood in sets:
            cells = [_fmt(by_key[det, ood], m) if (det, ood) in by_key else "-" for det in wanted for m in metrics]
            out.append("| " + " | ".join([ood, *cells]) + " |")
        out.append("")
    return "\n".join(out) + "\n"
