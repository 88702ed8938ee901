"""The results page of ``experiment=vae_fashionmnist`` (Gaussian decoder) and its categorical twin,
from finished runs only (the thesis' Fig. 3.4 pair: Fashion-MNIST ID, MNIST OOD).

    python sweeps/vae_fashionmnist.py --gaussian RUN --categorical RUN --logs DRIVER.log... \
        --page docs/results/vae_fashionmnist.md --figures docs/figures

Per run: the framework's own summary (``evaluate.py run_dir=RUN`` writes RUN/summary.md; its
table is copied as it is), bits/dim from ``generative.json``, the validation ELBO per epoch from
the CSV log (convergence), the score histograms / samples / reconstructions the run plotted, and
the driver logs' wall-time lines (``/usr/bin/time``) verbatim. A run without ``metrics.json`` is
reported as unfinished, never filled in.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _summary_table(run: Path) -> list[str]:
    subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"run_dir={run}"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    lines = (run / "summary.md").read_text().splitlines()
    return [line for line in lines if line.startswith("|")]


def _val_curve(run: Path) -> list[str]:
    log = run / "csv" / "metrics.csv"
    if not log.is_file():
        return [f"(no CSV log in {run}: run with logger=csv)"]
    rows = [r for r in csv.DictReader(log.open()) if r.get("val/elbo")]
    out = ["| epoch | val ELBO (nats/image) | val bits/dim |", "|---|---|---|"]
    out += [f"| {int(r['epoch']) + 1} | {float(r['val/elbo']):.1f} | {float(r['val/bpd']):.4f} |" for r in rows]
    return out


def _bits_per_dim(run: Path) -> list[str]:
    gen = json.loads((run / "generative.json").read_text())
    bpd = gen["bits_per_dim"]
    scores = list(next(iter(bpd.values())))
    out = [f"| split | {' | '.join(scores)} |", "|---|" + "---|" * len(scores)]
    out += [f"| {split} | {' | '.join(f'{v[s]:.4f}' for s in scores)} |" for split, v in bpd.items()]
    return out


def section(name: str, run: Path, figures: Path, page_dir: Path) -> list[str]:
    lines = [f"## {name} decoder (`{run.name}`)", ""]
    if not (run / "metrics.json").is_file():
        return [*lines, f"**Not finished**: {run} has no metrics.json (see its train.log).", ""]
    metrics = json.loads((run / "metrics.json").read_text())
    lines += [f"Likelihood `{json.loads((run / 'generative.json').read_text())['likelihood']}`; "
              f"config hash `{metrics['config_hash']}`; stage timings (s): "
              + ", ".join(f"{k} {v}" for k, v in metrics["timings_s"].items()), ""]
    lines += ["OOD detection (ID = Fashion-MNIST test, positive; higher score = ID; `evaluate.py run_dir=` summary):", ""]
    lines += [*_summary_table(run), ""]
    lines += ["Bits/dim (IWAE with K samples, and the ELBO; lower = more likely):", "", *_bits_per_dim(run), ""]
    lines += ["Validation ELBO per epoch (convergence):", "", *_val_curve(run), ""]
    for plot in ("scores", "samples", "reconstructions"):
        src = run / "plots" / f"{plot}.png"
        if src.is_file():
            dst = figures / f"vae_fashionmnist_{name.lower()}_{plot}.png"
            shutil.copyfile(src, dst)
            lines += [f"![{name} {plot}]({Path('..') / dst.relative_to(page_dir.parent)})", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaussian", type=Path, required=True)
    parser.add_argument("--categorical", type=Path, required=True)
    parser.add_argument("--logs", type=Path, nargs="*", default=[])
    parser.add_argument("--page", type=Path, required=True)
    parser.add_argument("--figures", type=Path, required=True)
    parser.add_argument("--intro", type=Path, help="a markdown file put first (setting, commands)")
    args = parser.parse_args()
    args.figures.mkdir(parents=True, exist_ok=True)
    page = [args.intro.read_text().rstrip(), ""] if args.intro else []
    page += ["Driver logs (start/end times, load averages, `/usr/bin/time` wall seconds), verbatim:", "", "```"]
    for log in args.logs:
        page += [f"# {log.name}", *[line for line in log.read_text().splitlines()
                                    if line.split(" ")[0] in ("gaussian", "categorical")]]
    page += ["```", ""]
    for name, run in (("Gaussian", args.gaussian), ("Categorical", args.categorical)):
        page += section(name, run, args.figures, args.page.parent)
    args.page.write_text("\n".join(page).rstrip() + "\n")
    print(f"wrote {args.page}")


if __name__ == "__main__":
    main()
