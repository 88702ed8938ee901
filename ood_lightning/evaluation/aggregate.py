"""Seed and sweep aggregation: every ``metrics.json`` under a directory -> mean ± std tables.

Runs are grouped by their Hydra overrides without ``seed=``, so a sweep
``-m lambda=1e-3,2e-3 seed=0,1,2`` gives one row per lambda, detector and OOD set.
Only files are read, so a failed or crashed run (``failed.json``) never spoils the rest.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import yaml

from ood_lightning.errors import ConfigError
from ood_lightning.evaluation.metrics import format_mean_std, mean_std

SUMMARY_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "tnr95", "autc", "macro_f1")


def _overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text()) or []) if path.exists() else []


def group_name(overrides: list[str]) -> str:
    """The run's setting without its seed (``-`` when only the seed was overridden)."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("seed=")]
    return " ".join(sorted(kept)) or "-"


def collect(run_dir: str | Path) -> tuple[list[dict], list[Path]]:
    """All finished runs (metrics + overrides) and the directories of failed ones."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} does not exist; pass the directory of a run or multirun")
    runs = []
    for path in sorted(run_dir.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        metrics["group"] = group_name(_overrides(path.parent))
        metrics["run"] = str(path.parent)
        runs.append(metrics)
    failed = sorted(p.parent for p in run_dir.rglob("failed.json") if not (p.parent / "metrics.json").exists())
    return runs, failed


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (group, detector, OOD set) with values per metric over seeds."""
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    accuracy: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        if run.get("accuracy") is not None:
            accuracy[run["group"]].append(run["accuracy"])
        for det, rows in run["results"].items():
            for ood, m in rows.items():
                for k in SUMMARY_METRICS:
                    if k in m:
                        values[(run["group"], det, ood)][k].append(m[k])
    rows = []
    for (group, det, ood), by_metric in values.items():
        row = {"group": group, "detector": det, "ood_set": ood, "n": len(next(iter(by_metric.values())))}
        mean, std = mean_std(accuracy[group]) if accuracy[group] else (float("nan"), float("nan"))
        row.update({"accuracy_mean": mean, "accuracy_std": std})
        for k, v in by_metric.items():
            row[f"{k}_mean"], row[f"{k}_std"] = mean_std(v)
            row[f"{k}_fmt"] = format_mean_std(v)
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], metrics=("auroc", "aupr_in", "fpr95", "autc")) -> str:
    """Paper-style table: one line per group × detector × OOD set, ×100, mean ± std (n seeds)."""
    head = ["setting", "detector", "OOD set", "n"] + [m for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["group"], r["detector"], r["ood_set"], str(r["n"])] + [r.get(f"{m}_fmt", "") for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(run_dir: str | Path) -> tuple[Path, Path, list[dict], list[Path]]:
    """Write ``summary.md`` and ``summary.csv`` into ``run_dir``."""
    run_dir = Path(run_dir)
    runs, failed = collect(run_dir)
    if not runs:
        raise ConfigError(f"no metrics.json under {run_dir}: did the runs finish? ({len(failed)} failed)")
    rows = aggregate(runs)
    md = run_dir / "summary.md"
    text = f"# Summary of {len(runs)} runs ({len(failed)} failed)\n\n" + to_markdown(rows)
    if failed:
        text += "\nFailed runs (see failed.json):\n" + "".join(f"- {p}\n" for p in failed)
    md.write_text(text)
    out_csv = run_dir / "summary.csv"
    with out_csv.open("w", newline="") as f:
        fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("group", "detector", "ood_set", "n"), k))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return md, out_csv, rows, failed
