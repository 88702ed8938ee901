"""AUROC / FPR95 of the post-hoc detectors with fp32 vs bf16 feature extraction (``evaluation.precision``),
on a published CIFAR ResNet, written into docs/performance.md by this command (never by hand).

    python benchmarks/precision_auroc.py --data-root /tmp/lossless --fit 3000 --test 1000 --ood 500
    python benchmarks/precision_auroc.py --backbone cifar_resnet56_pretrained ...
    python benchmarks/precision_auroc.py --only-write --out /tmp/prec     # re-write the table from finished runs

Runs ``train.py experiment=posthoc_cifar10`` twice (``evaluation.precision=fp32`` and ``=bf16``) with the
same subsets, each in its own run folder and feature cache, without the input-perturbation detectors
(ODIN*, Mahalanobis*: their passes are float32 whatever ``evaluation.precision`` says) and with the
per-layer mixtures dropped (``method=posthoc``: LSGM's fits take minutes and read the same features), then
compares every detector's AUROC and FPR95 per OOD set. The table replaces the block between the markers
``<!-- precision_auroc:begin -->`` / ``end`` in ``--doc`` (``benchmarks/doc_block.py``), with the setting (data, sizes, machine, load,
CPU flags: without AMX, bf16 is emulated and slow, but its rounding is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from doc_block import write_block  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="cifar_resnet20_pretrained")
    p.add_argument("--data-root", type=Path, help="folder with cifar10-{train,test}.npz and the OOD packs "
                   "(default: the framework's data root)")
    p.add_argument("--data-label", default="CIFAR-10", help="what --data-root holds, for the table's header")
    p.add_argument("--fit", type=int, default=3000, help="ID training images the detectors are fitted on")
    p.add_argument("--test", type=int, default=1000, help="ID test images")
    p.add_argument("--val", type=int, default=500, help="ID validation images")
    p.add_argument("--ood", type=int, default=500, help="images per OOD set")
    p.add_argument("--out", type=Path, default=Path("outputs/precision_auroc"))
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md")
    p.add_argument("--only-write", action="store_true", help="do not run; write the table from --out's runs")
    return p.parse_args(argv)


def overrides(args, precision: str) -> list[str]:
    out = ["experiment=posthoc_cifar10", f"backbone={args.backbone}", "method=posthoc", "trainer=cpu", "logger=csv",
           "ood=[odin,mnist,noise]", "~detectors.odin", "~detectors.mahalanobis_ensemble",
           f"evaluation.precision={precision}", f"evaluation.fit_limit={args.fit}", f"data.limit_test={args.test}",
           f"data.limit_val={args.val}", f"data.limit_ood={args.ood}",
           f"paths.cache_dir={args.out / 'cache'}", f"hydra.run.dir={args.out / precision}"]
    if args.data_root:
        out.append(f"paths.data_root={args.data_root}")
    return out


def run(args, precision: str) -> float:
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides(args, precision)]
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def rows(fp32: dict, bf16: dict) -> list[tuple]:
    """(detector, OOD set, AUROC fp32, AUROC bf16, FPR95 fp32, FPR95 bf16) for every pair both runs scored."""
    out = []
    for det, sets in sorted(fp32["detectors"].items()):
        other = bf16["detectors"].get(det, {})
        for name, m in sorted(sets.items()):
            if name in other and isinstance(m, dict) and "auroc" in m:
                out.append((det, name, m["auroc"], other[name]["auroc"], m.get("fpr95"), other[name].get("fpr95")))
    return out


def metrics_of(run_dir: Path) -> dict:
    """A finished run's ``metrics.json`` as ``{"detectors": {det: {set: {metric: percent}}}}``."""
    results = json.loads((run_dir / "metrics.json").read_text())["results"]
    return {"detectors": {det: {name: {k: 100 * v for k, v in m.items() if k in ("auroc", "fpr95")}
                                for name, m in sets.items() if isinstance(m, dict)}
                          for det, sets in results.items()}}


def table(args, fp32: dict, bf16: dict, meta: dict) -> str:
    found = rows(fp32, bf16)
    if not found:
        raise SystemExit("error: the two runs share no detector/OOD-set AUROC; check their metrics.json")
    diffs = [abs(b - a) for _, _, a, b, _, _ in found]
    fdiffs = [abs(b - a) for *_, a, b in found if a is not None and b is not None]
    lines = [f"Written by `python benchmarks/precision_auroc.py {meta['argv']}` on {meta['date']}: "
             f"`{args.backbone}`, {args.data_label}, detectors fitted on {args.fit} training images, {args.test} ID test "
             f"images, {args.ood} per OOD set, seed 0; {meta['cpu']}; load average {meta['load']}; wall time fp32 "
             f"{meta['wall_fp32']}, bf16 {meta['wall_bf16']}.", "",
             f"**Largest |AUROC difference| {max(diffs):.3f} points, median {sorted(diffs)[len(diffs) // 2]:.3f}; "
             f"largest |FPR95 difference| {max(fdiffs) if fdiffs else float('nan'):.3f} points** "
             f"({len(found)} detector x OOD-set pairs).", "",
             "| detector | OOD set | AUROC fp32 | AUROC bf16 | Δ | FPR95 fp32 | FPR95 bf16 | Δ |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for det, name, a, b, fa, fb in found:
        fpr = (f"{fa:.2f} | {fb:.2f} | {fb - fa:+.2f}" if fa is not None and fb is not None else "- | - | -")
        lines.append(f"| {det} | {name} | {a:.2f} | {b:.2f} | {b - a:+.3f} | {fpr} |")
    return "\n".join(lines)


def cpu_line() -> str:
    sys.path.insert(0, str(ROOT))
    from ood_lightning.core.cpu_runtime import fast_bf16

    kind = "AMX: bf16 native" if fast_bf16() else "no AMX: bf16 emulated by oneDNN, same rounding"
    return f"{os.cpu_count()}-core CPU ({kind}), 1 torch thread"


def main(argv=None) -> None:
    args = parse(argv)
    args.out = args.out.resolve()
    walls = {}
    load_before = os.getloadavg()[0]
    if not args.only_write:
        for precision in ("fp32", "bf16"):
            walls[precision] = f"{run(args, precision) / 60:.1f} min"
    meta = {"argv": " ".join(sys.argv[1:] if argv is None else argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": cpu_line(), "load": f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}",
            "wall_fp32": walls.get("fp32", "(earlier run)"), "wall_bf16": walls.get("bf16", "(earlier run)")}
    block = table(args, metrics_of(args.out / "fp32"), metrics_of(args.out / "bf16"), meta)
    write_block(args.doc, "precision_auroc", block)
    print(block)


if __name__ == "__main__":
    main()
