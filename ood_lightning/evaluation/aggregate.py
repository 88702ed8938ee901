"""Seed and sweep aggregation: every ``metrics.json`` under a directory -> mean ± std tables.

Runs are grouped by their Hydra overrides without ``seed=``, so a sweep
``-m lambda=1e-3,2e-3 seed=0,1,2`` gives one row per lambda, detector and OOD set.
Only files are read, so a failed, broken or killed job never spoils the rest: each is listed
with its overrides and one line (``failed.json`` first, then a damaged ``metrics.json``, then
a job folder with neither, then sweep jobs that never started).
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ood_lightning.core.errors import ConfigError
from ood_lightning.core.io import atomic_write_text
from ood_lightning.evaluation.metrics import format_mean_std, mean_std
from ood_lightning.evaluation.references import LOWER_IS_BETTER
from ood_lightning.evaluation.run_dir import JobIssue, job_dirs, never_started, overrides, read_metrics

SUMMARY_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "tnr95", "autc", "macro_f1")


def setting_overrides(overrides: list[str]) -> list[str]:
    """The run's overrides without its seed, sorted: what its setting is."""
    return sorted(o for o in overrides if not o.lstrip("+~").startswith("seed="))


def group_name(overrides: list[str]) -> str:
    """The run's setting without its seed (``-`` when only the seed was overridden)."""
    return " ".join(setting_overrides(overrides)) or "-"


#: a setting label longer than this gives every setting a short name (S1, S2, ...) and a legend line
MAX_LABEL = 40


@dataclass
class SettingLegend:
    """How tables and figures name the settings of a sweep: the overrides every run shares, said
    once, and per setting only the overrides that set it apart (``lambda=0.01``), or, when those
    are long, a short name (``S1``) explained by one legend line each."""

    common: list[str]
    labels: dict[str, str]  # group -> label
    differing: dict[str, str]  # group -> the overrides that set it apart

    @property
    def several(self) -> bool:
        return len(self.labels) > 1

    def markdown(self) -> str:
        """The lines under a table's heading: the shared overrides, then the named settings."""
        text = f"Every run: `{' '.join(self.common)}`.\n" if self.common else ""
        if any(label != self.differing[g] for g, label in self.labels.items()):
            text += "\nSettings:\n\n" + "".join(f"- {label}: `{self.differing[g]}`\n" for g, label in self.labels.items())
        return text


def setting_legend(rows: list[dict]) -> SettingLegend:
    """The :class:`SettingLegend` of :func:`aggregate` rows (or of runs from :func:`collect`), in
    the order their settings first appear."""
    by_group = {r["group"]: r["overrides"] for r in rows}
    common = [o for o in next(iter(by_group.values()), []) if all(o in s for s in by_group.values())]
    differing = {g: " ".join(o for o in s if o not in common) or "-" for g, s in by_group.items()}
    short = all(len(d) <= MAX_LABEL for d in differing.values())
    labels = differing if short else {g: f"S{i}" for i, g in enumerate(by_group, 1)}
    return SettingLegend(common, labels, differing)


def collect(run_dir: str | Path) -> tuple[list[dict], list[JobIssue]]:
    """All finished runs (metrics + group + run folder) and every job that gave no usable results."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} does not exist; pass the directory of a run or multirun")
    runs, issues = [], []
    for job in job_dirs(run_dir):
        metrics = read_metrics(job)
        if isinstance(metrics, JobIssue):
            issues.append(metrics)
            continue
        metrics["group"] = group_name(overrides(job))
        metrics["overrides"] = setting_overrides(overrides(job))
        metrics["run"] = str(job)
        runs.append(metrics)
    return runs, issues


def _fmt(values: list[float]) -> str:
    """mean ± std over runs; one run has no spread, so its value stands alone (not "± 0.0")."""
    return format_mean_std(values) if len(values) > 1 else f"{values[0] * 100:.1f}"


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (group, detector, OOD set) with values per metric over seeds."""
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    accuracy: dict[str, list[float]] = defaultdict(list)
    settings = {run["group"]: run["overrides"] for run in runs}
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
        row = {"group": group, "overrides": settings[group], "detector": det, "ood_set": ood,
               "n": len(next(iter(by_metric.values())))}
        mean, std = mean_std(accuracy[group]) if accuracy[group] else (float("nan"), float("nan"))
        row.update({"accuracy_mean": mean, "accuracy_std": std})
        for k, v in by_metric.items():
            row[f"{k}_mean"], row[f"{k}_std"] = mean_std(v)
            row[f"{k}_fmt"] = _fmt(v)
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], metrics=("auroc", "aupr_in", "fpr95", "autc")) -> str:
    """Paper-style table: one line per setting × detector × OOD set, ×100, mean ± std (n seeds).

    The overrides every run shares stand once above the table (:class:`SettingLegend`); the
    setting column, only with several settings, names each by what sets it apart.
    """
    legend = setting_legend(rows)
    head = (["setting"] if legend.several else []) + ["detector", "OOD set", "n"] + [m for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([legend.labels[r["group"]]] if legend.several else []) + [r["detector"], r["ood_set"], str(r["n"])]
        lines.append("| " + " | ".join(cells + [r.get(f"{m}_fmt", "") for m in metrics]) + " |")
    lower = [m for m in metrics if m in LOWER_IS_BETTER]
    spread = "mean ± std over a setting's n seeds" if any(r["n"] > 1 for r in rows) else "one run each"
    units = (f"{', '.join(metrics)}: ×100, {spread}"
             + (f"; {', '.join(lower)}: lower is better" if lower else "") + ".\n")
    return legend.markdown() + "\n" + units + "\n" + "\n".join(lines) + "\n"


def _issues_text(issues: list[JobIssue], unstarted: list[str]) -> str:
    text = ""
    for status, title in (("failed", "Failed jobs (see their failed.json)"),
                          ("unreadable", "Jobs with an unreadable metrics.json (re-run them)"),
                          ("did not finish", "Jobs that did not finish (killed, or still running)")):
        lines = [i.line() for i in issues if i.status == status]
        if status == "did not finish":
            lines += unstarted
        if lines:
            text += f"\n{title}:\n" + "".join(f"- {line}\n" for line in lines)
    return text


def write_summary(run_dir: str | Path) -> tuple[Path, Path, list[dict], list[JobIssue]]:
    """Write ``summary.md`` and ``summary.csv`` into ``run_dir`` (atomically: a reader never sees half)."""
    run_dir = Path(run_dir)
    runs, issues = collect(run_dir)
    unstarted = never_started(run_dir)
    if not runs:
        raise ConfigError(f"no readable metrics.json under {run_dir}: did the runs finish? "
                          f"({len(issues)} without results{': ' + issues[0].line() if issues else ''})")
    rows = aggregate(runs)
    counts = ", ".join(f"{sum(i.status == s for i in issues)} {s}" for s in ("failed", "unreadable", "did not finish")
                       if any(i.status == s for i in issues))
    spread = "1 run: no spread" if len(runs) == 1 else f"{len(runs)} runs"
    text = f"# Summary of {spread}" + (f" ({counts})" if counts else "") + "\n\n" + to_markdown(rows)
    if len(runs) > 1 and any(r["n"] == 1 for r in rows):
        text += "\nRows with n = 1 are single runs: no spread.\n"
    text += _issues_text(issues, unstarted)
    md = atomic_write_text(run_dir / "summary.md", text)
    buf = io.StringIO(newline="")
    fields = sorted({k for r in rows for k in r} - {"overrides"}, key=lambda k: (k not in ("group", "detector", "ood_set", "n"), k))
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    out_csv = atomic_write_text(run_dir / "summary.csv", buf.getvalue())
    return md, out_csv, rows, issues


def write_summary_artifacts(run_dir: str | Path, figures: list[Path]) -> Path:
    """``summary.json``: the figures of the aggregation under ``artifacts`` (paths relative to
    ``run_dir``), as a run's ``metrics.json`` lists its plots."""
    run_dir = Path(run_dir)
    listed = sorted(str(Path(f).resolve().relative_to(run_dir.resolve())) for f in figures)
    return atomic_write_text(run_dir / "summary.json", json.dumps({"artifacts": listed}, indent=2) + "\n")
