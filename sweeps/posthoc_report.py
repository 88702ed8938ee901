"""The results page of post-hoc runs (docs/results/<name>.md): accuracy, AUROC / FPR@95 / AUPR-in
per detector and OOD set, and wall time per stage, one section per run, from their metrics.json.

    python sweeps/posthoc_report.py --out docs/results/cifar10_posthoc.md \\
        "ResNet-20 (published)=<run dir>" "ResNet-56 (published)=<run dir>"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = (("auroc", "AUROC"), ("fpr95", "FPR@95"), ("aupr_in", "AUPR-in"))


def table(metrics: dict, key: str) -> list[str]:
    rows = metrics["results"]
    sets = [s for s in next(iter(rows.values())) if not s.startswith("mean_")]
    lines = ["| detector | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for det, by in rows.items():
        lines.append(f"| {det} | " + " | ".join(f"{100 * by[s][key]:.1f}" if s in by else "-" for s in sets) + " |")
    return lines


def section(title: str, run: Path) -> list[str]:
    m = json.loads((run / "metrics.json").read_text())
    out = [f"## {title}", "", f"ID test accuracy {100 * m['accuracy']:.2f}% (10,000 CIFAR-10 test images, the JPEG pack)."]
    for key, name in METRICS:
        out += ["", f"### {name} ×100 (ID = positive)", "", *table(m, key)]
    if m.get("fit_samples"):
        out += ["", f"Detectors fitted on {m['fit_samples']:,} ID training inputs"
                    f"{' (augmented)' if m.get('fit_augmented') else ''}."]
    chosen = {det: c["epsilon"] for det, c in m.get("selected", {}).items() if "epsilon" in c}
    if chosen:
        out += ["", "ε chosen on ID validation (pixel units): "
                + ", ".join(f"{det} {eps:g}" for det, eps in chosen.items()) + "."]
    t = m.get("timings_s", {})
    if t:
        out += ["", "### Wall time per stage (2-core CPU, shared with other jobs)", "", "| stage | seconds |", "|---|---|"]
        out += [f"| {k} | {v:.1f} |" for k, v in t.items()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="title=run_dir")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--header", type=Path, help="markdown put before the tables (commands, notes)")
    args = ap.parse_args()
    lines = [args.header.read_text().rstrip(), ""] if args.header else []
    for spec in args.runs:
        title, run = spec.split("=", 1)
        lines += section(title, Path(run)) + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
