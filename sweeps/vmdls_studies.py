"""VMDLS studies from finished runs (driven by sweeps/vmdls_ablations.sh).

    python sweeps/vmdls_studies.py table RUN_DIR...                 # macro-F1 / AUROC of every VMDLS score
    python sweeps/vmdls_studies.py table5 RUN_DIR [--ood tin_resize]  # paper Table 5: weighted VMDLS per feature set
    python sweeps/vmdls_studies.py latent RUN_DIR... --out FILE     # paper Table 4's 2-D latent, one panel per run
    python sweeps/vmdls_studies.py histograms RUN_DIR [--out FILE]  # paper Fig. 3: vmdls_b vs vmdls histograms

``table`` reads only ``metrics.json``; ``histograms`` only ``scores.npz``; ``latent`` rebuilds the
model from ``checkpoints/last.ckpt`` (its stored config) and plots μ of the ID test set (coloured
by class) and of each OOD set (grey) for runs trained with ``method.latent_dim=2``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def table(run_dirs: list[Path]) -> str:
    """A markdown table: run × VMDLS score × OOD set, macro-F1 and AUROC (×100)."""
    lines = ["| run | score | OOD set | macro-F1 | AUROC | TNR@95 |", "|---|---|---|---|---|---|"]
    for run in run_dirs:
        metrics = json.loads((run / "metrics.json").read_text())
        for score, rows in metrics["results"].items():
            if not score.startswith("vmdls") and score != "msp":
                continue
            for ood, m in rows.items():
                lines.append(f"| {run.name} | {score} | {ood} | {100 * m.get('macro_f1', float('nan')):.1f} | "
                             f"{100 * m['auroc']:.1f} | {100 * m['tnr95']:.1f} |")
    return "\n".join(lines)


#: paper Table 5 (CIFAR-10 vs ImageNet-resize, macro-F1 of VMDLS): feature set -> (our score name, paper's value)
TABLE5 = {
    "(t1, t2, t3, g, mu)": ("vmdls", 0.927),
    "(t2, t3, g, mu)": ("vmdls_mu_g_t3_t2", 0.925),
    "(t3, g, mu)": ("vmdls_mu_g_t3", 0.919),
    "(g, mu)": ("vmdls_mu_g", 0.918),
    "mu": ("vmdls_mu", 0.906),
}


def table5(run_dir: Path, ood: str = "tin_resize") -> str:
    """Paper Table 5 beside ours: macro-F1 of the reconstruction-weighted score of each feature subset
    (a run with ``method.ensemble_ablation=true``) against ``ood``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())["results"]
    missing = [name for name, _ in TABLE5.values() if ood not in metrics.get(name, {})]
    if missing:
        raise SystemExit(f"{run_dir}: no {ood} results for {missing}; Table 5 needs a run with "
                         "method.ensemble_ablation=true, the autoencoder on and that OOD set")
    lines = [f"| features | score | macro-F1 (ours, {ood}) | macro-F1 (paper, ImageNet-resize) |", "|---|---|---|---|"]
    for features, (name, paper) in TABLE5.items():
        lines.append(f"| {features} | {name} | {metrics[name][ood]['macro_f1']:.3f} | {paper:.3f} |")
    return "\n".join(lines)


def histograms(run_dir: Path, out: Path) -> Path:
    """Paper Fig. 3: ID test vs each OOD set, without (vmdls_b) and with (vmdls) reconstruction weighting."""
    from ood_lightning.evaluation.plots import score_histograms

    scores = np.load(run_dir / "scores.npz")
    picked = {}
    for det in ("vmdls_b", "vmdls"):
        picked[det] = {k.split("/", 1)[1]: scores[k] for k in scores.files if k.startswith(f"{det}/")}
    return score_histograms(picked, out)


def latent(run_dirs: list[Path], out: Path, limit: int = 3000, allow_unsafe: bool = False) -> Path:
    """Scatter of the 2-D head mean μ per run: ID test by class, OOD sets in grey."""
    from ood_lightning.evaluation.style import styled

    return styled(_latent)(run_dirs, out, limit, allow_unsafe)


def _latent(run_dirs: list[Path], out: Path, limit: int, allow_unsafe: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from ood_lightning.core.checkpoints import SCRIPT_OPT_IN
    from ood_lightning.data.datamodule import OODDataModule
    from ood_lightning.evaluation.style import legend, save
    from ood_lightning.run.build import build_model, load_weights, stored_config

    fig, axes = plt.subplots(1, len(run_dirs), figsize=(4 * len(run_dirs), 4), squeeze=False)
    for ax, run in zip(axes[0], run_dirs):
        ckpt = run / "checkpoints" / "last.ckpt"
        cfg = stored_config(ckpt, allow_unsafe, opt_in=SCRIPT_OPT_IN)
        dm = OODDataModule(cfg.data, cfg.ood)
        dm.setup("test")
        model = build_model(cfg, dm.num_classes, pretrained=False)
        load_weights(model, ckpt, allow_unsafe)
        model.eval()
        if model.latent_dim != 2:
            raise SystemExit(f"{run}: latent_dim={model.latent_dim}; the scatter needs method.latent_dim=2")
        loaders = dm.eval_dataloaders()
        for split, loader in loaders.items():
            if split == "id_val":
                continue
            mus, labels = [], []
            with torch.no_grad():
                for x, y in loader:
                    mus.append(model.latent.mu(model.backbone(dm.preprocess(x))))
                    labels.append(y)
                    if sum(len(m) for m in mus) >= limit:
                        break
            mu, y = torch.cat(mus)[:limit].numpy(), torch.cat(labels)[:limit].numpy()
            if split == "id_test":
                ax.scatter(mu[:, 0], mu[:, 1], c=y % 10, cmap="tab10", vmin=0, vmax=9, s=2, alpha=0.6)
            else:
                ax.scatter(mu[:, 0], mu[:, 1], color="grey", marker="x", s=2, alpha=0.3, label=split)
        ax.set(title=run.name, xlabel="μ₁ (latent units)", ylabel="μ₂ (latent units)")
        legend(ax, markerscale=4)
    return save(fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["table", "table5", "latent", "histograms"])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--ood", default="tin_resize", help="table5: the OOD set (the paper's ImageNet-resize)")
    parser.add_argument("--allow-unsafe-checkpoint", action="store_true", help="build a stored config that names code outside the project (only for a file you trust)")
    args = parser.parse_args()
    if args.study == "table":
        print(table(args.runs))
    elif args.study == "table5":
        print(table5(args.runs[0], args.ood))
    elif args.study == "latent":
        print(latent(args.runs, args.out or args.runs[0].parent / "latent.png", allow_unsafe=args.allow_unsafe_checkpoint))
    else:
        print(histograms(args.runs[0], args.out or args.runs[0] / "plots" / "vmdls_histograms.png"))


if __name__ == "__main__":
    from ood_lightning.run.cli import exit_on_error

    exit_on_error(main)
