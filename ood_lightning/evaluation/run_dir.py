"""What a run directory says about its run: results, a failure marker, or nothing yet.

A run's outcome must never be ambiguous. At its start a run moves an earlier attempt's results
into ``stale/<time>/`` (so a failed re-run cannot be reported with the old numbers), and a
failure writes ``failed.json``, atomically; readers (aggregation, the sweep's exit report)
look for ``failed.json`` first.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from ood_lightning.core.io import atomic_write_text

log = logging.getLogger(__name__)

METRICS_FILE, SCORES_FILE, FAILED_FILE = "metrics.json", "scores.npz", "failed.json"
#: an attempt's results: what ``clear_stale_results`` moves away before the next attempt
RESULTS = (METRICS_FILE, SCORES_FILE, FAILED_FILE, "plots")
STALE_DIR = "stale"


def clear_stale_results(out_dir: str | os.PathLike) -> Path | None:
    """Move an earlier attempt's results in ``out_dir`` to ``out_dir/stale/<UTC time>/``; returns that
    folder (``None`` when there was nothing). Checkpoints stay: a resumed run reads them.

    Only the first process of a (DDP) run does it; the other ranks start later, in the same folder.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return None
    out_dir = Path(out_dir)
    found = [out_dir / name for name in RESULTS if (out_dir / name).exists()]
    if not found:
        return None
    stale = out_dir / STALE_DIR / datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S.%f")
    stale.mkdir(parents=True)
    for path in found:
        os.replace(path, stale / path.name)
    log.warning("%s held results of an earlier attempt (%s): moved to %s", out_dir,
                ", ".join(p.name for p in found), stale)
    return stale


def write_failure(out_dir: str | os.PathLike, err: BaseException, extra: dict | None = None) -> Path:
    """``failed.json``: the error's one line and the traceback (call from inside ``except``), plus
    ``extra`` fields (e.g. a terminated run's ``reason`` and ``resume_command``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"error": f"{type(err).__name__}: {err}", **(extra or {}), "traceback": traceback.format_exc()}
    text = json.dumps(record, indent=2)
    return atomic_write_text(out_dir / FAILED_FILE, text)


def is_stale(path: Path, root: Path) -> bool:
    """Whether ``path`` lies in a ``stale/`` folder below ``root``."""
    return STALE_DIR in path.relative_to(root).parts


def overrides(run: Path) -> list[str]:
    """The job's command-line overrides (``.hydra/overrides.yaml``; none when absent or unreadable)."""
    path = run / ".hydra" / "overrides.yaml"
    try:
        return [str(o) for o in yaml.safe_load(path.read_text()) or []] if path.exists() else []
    except (yaml.YAMLError, OSError, TypeError):
        return []


def first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


@dataclass
class JobIssue:
    """A job that gave no usable results: ``failed``, ``unreadable`` (a damaged results file) or
    ``did not finish`` (killed, or still running); ``reason`` is one line."""

    path: Path
    status: str
    reason: str = ""
    overrides: list[str] = field(default_factory=list)

    def line(self) -> str:
        setting = " ".join(sorted(self.overrides)) or "no overrides"
        return f"{self.path} [{setting}]: {self.status}" + (f": {self.reason}" if self.reason else "")


def failure(run: Path) -> JobIssue | None:
    """The job's failure from its ``failed.json``, ``None`` when it has none."""
    path = run / FAILED_FILE
    if not path.exists():
        return None
    try:
        reason = first_line(json.loads(path.read_text()).get("error", ""))
    except (ValueError, OSError, AttributeError) as err:
        reason = f"({FAILED_FILE} unreadable: {err})"
    return JobIssue(run, "failed", reason or "(no error recorded)", overrides(run))


def read_metrics(run: Path) -> dict | JobIssue:
    """The job's ``metrics.json``, or the issue that stops it being used (failed first, then damaged,
    then absent)."""
    failed = failure(run)
    if failed is not None:
        return failed
    path = run / METRICS_FILE
    if not path.exists():
        return JobIssue(run, "did not finish", "neither metrics.json nor failed.json (killed, or still running)",
                        overrides(run))
    try:
        metrics = json.loads(path.read_text())
        if not isinstance(metrics, dict) or not isinstance(metrics.get("results"), dict):
            raise ValueError("no 'results' mapping")
    except (ValueError, OSError) as err:
        return JobIssue(path, "unreadable", f"{type(err).__name__}: {first_line(err)}", overrides(run))
    return metrics


def _is_aggregation(run: Path) -> bool:
    """An ``evaluate.py run_dir=`` job (it writes summaries, not results)."""
    return any(o.lstrip("+~").startswith("run_dir=") for o in overrides(run))


def job_dirs(root: str | os.PathLike) -> list[Path]:
    """Every job folder under ``root`` (itself included): a Hydra job (``.hydra/``) or a folder with
    results or a failure marker, leaving out ``stale/`` folders and aggregation jobs."""
    root = Path(root)
    found = {p.parent for name in (".hydra", METRICS_FILE, FAILED_FILE) for p in root.rglob(name)}
    return sorted(p for p in found if not is_stale(p, root) and not _is_aggregation(p))


def never_started(root: str | os.PathLike) -> list[str]:
    """For each sweep (``multirun.yaml``) under ``root``: how many of its jobs have no folder at all,
    from the product of its swept values (sweeps Hydra cannot expand here are skipped)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    root, notes = Path(root), []
    for spec in sorted(root.rglob("multirun.yaml")):
        if is_stale(spec, root):
            continue
        try:
            task = (yaml.safe_load(spec.read_text()) or {})["hydra"]["overrides"]["task"]
            expected = 1
            for o in OverridesParser.create().parse_overrides([str(t) for t in task or []]):
                if o.is_sweep_override():
                    expected *= len(list(o.sweep_string_iterator()))
        except Exception as err:  # noqa: BLE001 - a glob sweep or a foreign file: nothing to compare against
            log.debug("cannot count the jobs of %s: %s", spec, err)
            continue
        started = sum(1 for p in spec.parent.iterdir() if (p / ".hydra").is_dir())
        if expected > started:
            missing = expected - started
            notes.append(f"{spec.parent}: {missing} job{'s' if missing > 1 else ''} of {expected} never started")
    return notes

