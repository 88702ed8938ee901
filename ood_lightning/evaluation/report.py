"""A run's results page, written from its ``metrics.json`` alone (no typed number, nothing re-run).

    python evaluate.py run_dir=<run> report=docs/results/<page>.md [paper=lde|lsgm|...|all]

The page states where the numbers come from (the command, the commit, the machine and its load,
the wall time per stage), the setting a reader needs to compare them (ID data and its encoding,
backbone, split sizes, cut-downs, each scorer's fit split and input pre-processing, the OOD sets
with their groups), every metric as a table (each group mean says which sets it averages) and,
with ``paper=``, the paper view of :mod:`~ood_lightning.evaluation.paper_compare`. A run folder
holding several runs (a multirun) gets one section per run, in folder order.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ood_lightning.core import provenance
from ood_lightning.core.errors import ConfigError
from ood_lightning.core.io import atomic_write_text
from ood_lightning.evaluation.paper_compare import LEGEND, backbone_label, section, setting_of
from ood_lightning.evaluation.references import LOWER_IS_BETTER, load
from ood_lightning.evaluation.run_dir import job_dirs

#: the tables of a page, in order: metrics.json key -> heading
METRICS = {"auroc": "AUROC", "fpr95": "FPR@95%TPR", "tnr95": "TNR@95%TPR", "aupr_in": "AUPR-in", "aupr_out": "AUPR-out",
           "detection_error": "Detection error", "autc": "AuTC", "macro_f1": "Open-set macro-F1"}


def _runs(run_dir: Path) -> list[Path]:
    if (run_dir / "metrics.json").is_file():
        return [run_dir]
    runs = [job for job in job_dirs(run_dir) if (job / "metrics.json").is_file()]
    if not runs:
        raise ConfigError(f"report=: no metrics.json in {run_dir} or its run folders; pass the folder of a "
                          "finished run (train.py's output folder)")
    return runs


def _read(run: Path) -> dict:
    try:
        return json.loads((run / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"report=: {run / 'metrics.json'} is unreadable ({err}); re-run that job") from None


def _sets(results: dict) -> list[str]:
    """OOD sets in the order the run scored them, group means last."""
    seen: dict[str, None] = {}
    for rows in results.values():
        seen.update(dict.fromkeys(rows))
    return [s for s in seen if not s.startswith("mean_")] + [s for s in seen if s.startswith("mean_")]


def metric_table(results: dict, key: str) -> list[str]:
    sets = _sets(results)
    lines = ["| scorer | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
    for det, rows in results.items():
        cells = [f"{100 * rows[s][key]:.2f}" if s in rows and isinstance(rows[s].get(key), (int, float)) else "–"
                 for s in sets]
        lines.append(f"| {det} | " + " | ".join(cells) + " |")
    return lines


def _setting_lines(m: dict) -> list[str]:
    st = m.get("setting") or {}
    data = st.get("id_data") or {}
    splits = st.get("splits") or {}
    out = []
    if data:
        classes = f", classes {data['known_classes']}" if data.get("known_classes") is not None else ""
        out.append(f"- ID data: `{data['name']}` ({data['encoding']} images of {data['set']}{classes}); "
                   + ", ".join(f"{k} {v:,}" for k, v in splits.items() if v is not None))
    else:
        out.append(f"- ID data: `{m.get('data')}` (encoding not recorded: a run older than the setting record)")
    bb = m.get("backbone")
    out.append(f"- backbone: {backbone_label(bb)} (`{bb}`)" + (f", checkpoint `{m['checkpoint']}`" if m.get("checkpoint") else "")
               + f"; method `{m.get('method')}`; seed {m.get('seed')}")
    ood = st.get("ood") or {}
    if ood:
        out.append("- OOD sets: " + ", ".join(f"`{n}` ({o['dataset']}, {o['n']:,}, group {o['group'] or '–'})"
                                             for n, o in ood.items()))
    for group, members in (st.get("groups") or {}).items():
        if len(members) > 1:
            out.append(f"- `mean_{group}` = the mean over {', '.join(f'`{s}`' for s in members)}")
    scorers = st.get("scorers") or {}
    fits: dict[str, list[str]] = {}
    for det, info in scorers.items():
        fit = info.get("fit")
        if fit is not None:
            total = splits.get("train")
            size = f"{fit['samples']:,}" + (f" of {total:,}" if total and fit["samples"] < total else " (the whole split)"
                                             if total else "")
            fits.setdefault(f"{'augmented' if fit['augmented'] else 'plain'} training inputs, {size}", []).append(det)
    for what, dets in fits.items():
        out.append(f"- fitted on {what}: {', '.join(dets)}")
    pre = {det: info["input_perturbation"] for det, info in scorers.items() if info.get("input_perturbation")}
    out.append("- input pre-processing: " + ("; ".join(
        f"{det} ε = {p['epsilon']:g} ({'chosen on ID validation from ' + str(p['grid']) if p['grid'] else 'fixed'})"
        for det, p in pre.items()) + "; none for the others" if pre else "none (no scorer perturbs its inputs)"))
    for det, info in scorers.items():
        extra = {k: v for k, v in info.items() if k not in ("fit", "input_perturbation")}
        if extra:
            out.append(f"- {det}: " + ", ".join(f"{k} {v}" for k, v in extra.items()))
    cut = [f"{k}={v}" for k, v in (st.get("limits") or {}).items()
           if k != "evaluation.fit_limit" or (splits.get("train") and v < splits["train"])]
    if st.get("debug"):
        cut.append(f"debug={st['debug']}")
    if data.get("encoding") not in (None, "lossless"):
        cut.append(f"ID data is the {data['encoding']}")
    if cut:
        out.insert(0, f"- ⚠ **cut-down run, not a result**: {'; '.join(cut)}")
    return out


def _provenance_lines(m: dict) -> list[str]:
    p = m.get("provenance") or {}
    if not p:
        return ["- provenance not recorded (a run older than the provenance record)"]
    commit = p.get("commit") or {}
    sha = (commit.get("sha") or "unknown")[:12] + (" with uncommitted changes" if commit.get("dirty") else "")
    wall = p.get("wall_s")
    return [f"- command: `{p.get('command')}`", f"- commit: `{sha}`",
            f"- machine: {provenance.describe_machine(p.get('machine') or {})} (when the results were written)",
            f"- wall time: {wall:,.0f} s from the config to the results (interpreter start-up not counted)"
            if wall is not None else "- wall time: not recorded"]


def run_section(run: Path, m: dict, paper: str | None, level: str = "##") -> list[str]:
    acc = m.get("accuracy")
    out = [f"{level} Provenance", "", *_provenance_lines(m), "", f"{level} Setting", "", *_setting_lines(m), ""]
    if acc is not None:
        out += [f"ID test accuracy: **{100 * acc:.2f}%**", ""]
    results = m.get("results") or {}
    for key, name in METRICS.items():
        if any(key in row for rows in results.values() for row in rows.values()):
            arrow = " (lower is better)" if key in LOWER_IS_BETTER else ""
            out += [f"{level} {name} ×100{arrow}, ID = positive", "", *metric_table(results, key), ""]
    timings = m.get("timings_s") or {}
    if timings:
        out += [f"{level} Wall time per stage (s)", "", "| stage | seconds |", "|---|---:|",
                *(f"| {k} | {v:,.1f} |" for k, v in timings.items()), ""]
    if paper:
        out += [f"{level} Ours vs the paper{'s' if paper == 'all' else ''}: {paper}", "", LEGEND, "",
                section(load(paper), setting_of(m)).rstrip(), ""]
    return out


def report_text(run_dir: str | Path, page: str | Path, paper: str | None = None) -> str:
    run_dir = Path(run_dir)
    runs = _runs(run_dir)
    command = "python evaluate.py " + shlex.join([f"run_dir={run_dir}", f"report={page}",
                                                  *([f"paper={paper}"] if paper else [])])
    first = _read(runs[0])
    title = (f"# Results: {first.get('method')} on {backbone_label(first.get('backbone'))}, "
             f"ID {first.get('data')}")
    lines = [title, "", f"Written by `{command}` from `metrics.json` alone; do not edit by hand (re-run the command).",
             ""]
    if len(runs) == 1:
        return "\n".join(lines + run_section(runs[0], first, paper)) + "\n"
    for run in runs:
        m = _read(run)
        lines += [f"## Run `{run.relative_to(run_dir)}`: {m.get('method')} on {backbone_label(m.get('backbone'))}, "
                  f"ID {m.get('data')}", "", *run_section(run, m, paper, level="###")]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, page: str | Path, paper: str | None = None) -> Path:
    """Write the results page of the run(s) under ``run_dir`` to ``page``; returns its path."""
    text = report_text(run_dir, page, paper)
    page = Path(page)
    page.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(page, text)


# -- a block inside a hand-written page (the README's demo table) --------------------------------


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- report:{name} -->", f"<!-- /report:{name} -->"


def block_text(run_dir: str | Path, page: str | Path, name: str) -> str:
    """The short form for a page written by hand around it: where the numbers come from, the ID
    accuracy and the AUROC table of one run."""
    run = _runs(Path(run_dir))
    if len(run) != 1:
        raise ConfigError(f"report_block= takes one run's folder; {run_dir} holds {len(run)} runs")
    m = _read(run[0])
    p = m.get("provenance") or {}
    commit = p.get("commit") or {}
    sha = (commit.get("sha") or "unknown")[:12] + (" with uncommitted changes" if commit.get("dirty") else "")
    wall = p.get("wall_s")
    command = "python evaluate.py " + shlex.join([f"run_dir={run_dir}", f"report={page}", f"report_block={name}"])
    acc = m.get("accuracy")
    lines = [f"Measured by `{p.get('command')}` at commit `{sha}` on {provenance.describe_machine(p.get('machine') or {})}"
             + (f", {wall:,.0f} s wall" if wall is not None else "") + "; "
             + (f"ID test accuracy {100 * acc:.2f}%; " if acc is not None else "") + "AUROC ×100, ID = positive. "
             f"Written by `{command}`; do not edit by hand.", "", *metric_table(m.get("results") or {}, "auroc")]
    return "\n".join(lines)


def _split(text: str, name: str, page: Path) -> tuple[str, str, str]:
    start, end = _markers(name)
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ConfigError(f"{page} has no block {name!r}: put the lines {start} and {end} where it goes")
    head, rest = text.split(start)
    body, tail = rest.split(end)
    return head, body, tail


def _numbers(block: str) -> list[str]:
    """What must not change between two runs of the same setting: the table and the accuracy."""
    acc = [part.strip() for part in block.split(";") if part.strip().startswith("ID test accuracy")]
    return acc + [line for line in block.splitlines() if line.startswith("|")]


def write_block(run_dir: str | Path, page: str | Path, name: str, check: bool = False) -> Path:
    """Replace the block ``name`` of ``page`` with the run's :func:`block_text`; with ``check``, write
    nothing and fail (naming the first difference) unless the page's block has the run's numbers."""
    page = Path(page)
    if not page.is_file():
        raise ConfigError(f"report={page} does not exist: report_block= fills a block of an existing page")
    text = page.read_text()
    head, body, tail = _split(text, name, page)
    fresh = block_text(run_dir, page, name)
    if check:
        ours, theirs = _numbers(fresh), _numbers(body)
        if ours != theirs:
            diff = next((f"{a!r} vs {b!r}" for a, b in zip(theirs, ours) if a != b),
                        f"{len(theirs)} vs {len(ours)} lines")
            raise ConfigError(f"{page}'s block {name!r} differs from the run in {run_dir}: {diff} (page vs run); "
                              f"if the change is meant, re-record it: python evaluate.py run_dir=<run> report={page} "
                              f"report_block={name}")
        return page
    start, end = _markers(name)
    return atomic_write_text(page, f"{head}{start}\n{fresh}\n{end}{tail}")


if __name__ == "__main__":  # python -m ood_lightning.evaluation.report <run_dir> <page> [paper]
    print(write_report(*sys.argv[1:4]))
