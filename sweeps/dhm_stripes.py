"""The stripes study of the DHM paper (§4.3, Fig. 8): flow density over the 2-D feature plane
with the ID and OOD embeddings, for a low and a high λ.

Trains ``experiment=dhm_stripes`` (randomly initialised 2-channel conv -> |·| -> max-pool ->
2-D feature; the softmax of the two features is the classifier; 50-block residual flow, hidden
32, on the raw feature; the authors' plain SGD lr 0.01, 160 epochs, their default λ 0.01) once
per λ through the real entrypoint, then evaluates the flow's log-density on a grid over the
feature plane and scatters the test embeddings (horizontal, vertical: ID; diagonal: OOD) on
top. At a low λ the density sits on the two ID arms and the diagonal stripes, which excite
both filters, fall between them; at a high λ the NLL term wins, the extractor squeezes the
features together where the flow is sharp (the log-det grows) and the DHM score no longer
separates ID from OOD. Writes, under --out:

    lambda<λ>/                     each run's directory (metrics.json, csv/metrics.csv, checkpoint)
    fig8_stripes.png               one heat-map per λ
    fig8_lambda_curve.png          AUROC (DHM, MSP), accuracy and log-det against λ (two or more λ)
    results.json                   λ, test accuracy, AUROC (DHM, MSP), last train log-det, volume,
                                   |cos| of the learned filters with the Prewitt ones;
                                   rerunning with the same --out keeps the (λ, epochs) already in it

    python sweeps/dhm_stripes.py                              # paper scale: λ = 1e-3 and 1, 160 epochs
    python sweeps/dhm_stripes.py --cpu                        # minutes on a CPU
    python sweeps/dhm_stripes.py --lambdas 1e-3 1e-1 1 --epochs 20 -- method.optimizer.lr=0.05
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from ood_lightning.evaluation.style import PALETTE, legend, reference, save, styled
from ood_lightning.evaluation.sweep_plots import last_epoch_values
from ood_lightning.methods.dhm.volume import evaluate_on_grid
from ood_lightning.nn.backbones.prewitt import PREWITT_HORIZONTAL, PREWITT_VERTICAL

matplotlib.use("Agg")  # no display: figures go to files


@torch.no_grad()
def embeddings(model, dm) -> dict[str, np.ndarray]:
    """2-D features of the ID test set by class and of every OOD set."""
    pre = dm.preprocess
    feats = model.backbone(pre(dm.test_set.images)).numpy()
    labels = dm.test_set.labels.numpy()
    out = {"horizontal (ID)": feats[labels == 0], "vertical (ID)": feats[labels == 1]}
    for name, data in dm.ood_sets.items():
        out[f"{name} (OOD)"] = model.backbone(pre(data.images)).numpy()
    return out


def prewitt_alignment(weight: torch.Tensor) -> dict[str, float]:
    """|cosine| between each learned 3x3 filter and the Prewitt solution (§4.3: "compare the DHM's
    parameters after training to a known solution"), after removing the filter's mean (a constant
    offset answers no stripe direction). Absolute: |·| follows the conv, so a filter and its
    negative give the same feature. ``weight``: (2, 1, 3, 3), channel k = class k's logit."""
    out = {}
    for k in range(2):
        f = weight[k, 0].detach().float()
        f = f - f.mean()
        for ref_name, ref in (("horizontal", PREWITT_HORIZONTAL), ("vertical", PREWITT_VERTICAL)):
            cos = (f * ref).sum() / (f.norm() * ref.norm()).clamp_min(1e-12)
            out[f"ch{k}_{ref_name}"] = round(abs(float(cos)), 4)
    return out


def run_one(lam: float, epochs: int, grid: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"lambda{_common.tag(lam)}"
    start = time.time()
    metrics, model, dm = _common.train_run(["experiment=dhm_stripes", f"lambda={lam}",
                                            f"trainer.max_epochs={epochs}", *extra], run_dir)
    emb = embeddings(model, dm)
    pts = np.concatenate(list(emb.values()))
    lo, hi = pts.min(0), pts.max(0)
    pad = 0.25 * float((hi - lo).max()) + 1e-3
    lim = (float(min(lo) - pad), float(max(hi) + pad))  # a square window over the feature plane
    density = evaluate_on_grid(model.log_density, lim, lim, grid)
    np.savez_compressed(run_dir / "feature_density.npz", xs=density.xs, ys=density.ys,
                        log_density=density.log_density, **{k.split(" ")[0]: v for k, v in emb.items()})
    log_rows = last_epoch_values(run_dir / "csv" / "metrics.csv", ["train/logdet", "train/nll", "val/acc"])
    res = metrics["results"]
    first_ood = next(iter(res.get("dhm", {})), None)
    rec = {"lambda": lam, "epochs": epochs, "accuracy": metrics["accuracy"],
           "auroc_dhm": res.get("dhm", {}).get(first_ood, {}).get("auroc"),
           "auroc_msp": res.get("msp", {}).get(first_ood, {}).get("auroc"),
           "train_logdet": log_rows.get("train/logdet"), "train_nll": log_rows.get("train/nll"),
           "feature_plane_volume": density.volume,
           "prewitt_cos": prewitt_alignment(model.backbone.conv.weight), "seconds": round(time.time() - start, 1), "run": str(run_dir)}
    print(f"[dhm_stripes] λ={lam}: acc {rec['accuracy']:.3f}, AUROC dhm {rec['auroc_dhm']:.3f} / msp "
          f"{rec['auroc_msp']:.3f}, log-det {rec['train_logdet']:.3g}, {rec['seconds']} s", flush=True)
    return rec


@styled
def plot_fig8(records: list[dict], path: Path, span: float = 12.0) -> Path:
    """log p_flow over the feature plane (``span`` nats below its maximum) with the embeddings."""
    fig, axes = plt.subplots(1, len(records), figsize=(max(6.5, 5.2 * len(records)), 4.8), squeeze=False)
    # the paper's colours (Fig. 8): horizontal blue, vertical green, diagonal (OOD) orange
    colours = {"horizontal": PALETTE[0], "vertical": PALETTE[2], "diagonal": PALETTE[1]}
    for ax, rec in zip(axes[0], records):
        g = np.load(Path(rec["run"]) / "feature_density.npz")
        logp = g["log_density"]
        top = float(np.nanmax(logp))
        # grey scale (dark = dense) so the blue / green / orange points stay readable on it
        im = ax.imshow(np.clip(logp, top - span, top), origin="lower", cmap="Greys", alpha=0.85,
                       extent=(g["xs"][0], g["xs"][-1], g["ys"][0], g["ys"][-1]))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="log p_flow(h)")
        names = [k for k in g.files if k not in ("xs", "ys", "log_density")]
        for k, name in enumerate(names):
            h, colour = g[name], colours.get(name, PALETTE[3 + k % 4])
            label = f"{name} ({'ID' if name in ('horizontal', 'vertical') else 'OOD'})"
            ax.scatter(h[:, 0], h[:, 1], s=8, alpha=0.7, color=colour, linewidths=0, label=label)
        # which channel answers which direction is learned (random init); with the softmax head
        # feature k is class k's logit (0 horizontal, 1 vertical)
        ax.set_xlabel("feature 0 (max-pooled |conv channel 0|)")
        ax.set_ylabel("feature 1 (max-pooled |conv channel 1|)")
        ax.set_title(f"λ = {rec['lambda']:g}: acc {rec['accuracy']:.3f}, DHM AUROC {rec['auroc_dhm']:.3f}\n"
                     f"train log-det {rec['train_logdet']:.3g}")
        ax.grid(False)
        legend(ax, loc="upper right", frameon=True, framealpha=0.85)
    return save(fig, path, f"DHM stripes (§4.3 Fig. 8): log p_flow(h) over the feature plane, {_epochs(records)}")


def _epochs(records: list[dict]) -> str:
    """``160 epochs`` (or ``epochs 40, 160``): the figures say how long the models trained."""
    epochs = sorted({r.get("epochs") for r in records} - {None})
    return f"{epochs[0]} epochs" if len(epochs) == 1 else f"epochs {', '.join(map(str, epochs))}" if epochs else "epochs ?"


@styled
def plot_lambda_curve(records: list[dict], path: Path) -> Path:
    """OOD AUROC (DHM, MSP) and test accuracy against λ, and the last epoch's mean train log-det:
    the paper's "search over λ values" (§4.3), where the DHM's AUROC drops to chance above a threshold."""
    recs = sorted(records, key=lambda r: r["lambda"])
    lams = [r["lambda"] for r in recs]
    fig, (ax, ax_ld) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label, colour in (("auroc_dhm", "DHM AUROC (diagonal OOD)", PALETTE[0]),
                               ("auroc_msp", "MSP AUROC (diagonal OOD)", PALETTE[1]),
                               ("accuracy", "test accuracy", PALETTE[2])):
        ax.plot(lams, [r[key] for r in recs], marker="o", color=colour, label=label)
    reference(ax, y=0.5)
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("AUROC / accuracy (fraction; 0.5 = chance)")
    ax_ld.plot(lams, [r["train_logdet"] for r in recs], marker="o", color=PALETTE[3])
    ax_ld.set_ylabel("flow log-det, last epoch's train mean")
    for a in (ax, ax_ld):
        a.set_xscale("log")
        a.set_xlabel("λ (weight of the flow's NLL in the loss)")
    legend(ax, loc="lower left")
    return save(fig, path, f"DHM stripes against λ, {_epochs(recs)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[1e-3, 1.0])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--grid", type=int, default=None, help="grid points per axis")
    ap.add_argument("--cpu", action="store_true", help="small scale: 15 epochs, SGD lr 0.05 for the conv, 80x80 grid")
    ap.add_argument("--out", type=Path, default=Path("outputs/sweeps/dhm_stripes") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for train.py (after --)")
    args = ap.parse_args()
    _common.log_progress()
    epochs = args.epochs or (15 if args.cpu else 160)
    grid = args.grid or (80 if args.cpu else 300)
    # with 15 instead of 160 epochs the paper's SGD lr 0.01 leaves the head near chance
    extra = (["method.optimizer.lr=0.05", "~callbacks.progress_bar"] if args.cpu else []) + list(args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    # resumable like sweeps/dhm_2d.py: a λ already in --out's results.json is kept, not retrained
    path = args.out / "results.json"
    done = {(r["lambda"], r.get("epochs")): r for r in json.loads(path.read_text())} if path.exists() else {}
    for lam in args.lambdas:
        if (lam, epochs) not in done:
            done[(lam, epochs)] = run_one(lam, epochs, grid, args.out, extra)
            path.write_text(json.dumps(list(done.values()), indent=2))
    records = [done[(lam, epochs)] for lam in args.lambdas]
    print("wrote", plot_fig8(records, args.out / "fig8_stripes.png"))
    if len(records) > 1:
        print("wrote", plot_lambda_curve(records, args.out / "fig8_lambda_curve.png"))
    for r in records:
        print(json.dumps({k: v for k, v in r.items() if k != "run"}))


if __name__ == "__main__":
    main()
