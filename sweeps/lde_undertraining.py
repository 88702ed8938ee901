"""LDE under-training study (paper Fig. 5): AUROC and ID/OOD bits per dimension of a latent
flow against training steps, on the cached features of a trained classifier.

    python sweeps/lde_undertraining.py --ckpt outputs/train/runs/<run>/checkpoints/last.ckpt \
        --flow glow --epochs 5 --eval-every 50 --out outputs/lde_undertraining.png

The paper's point: one epoch is near the AUROC peak, longer training overfits the ID latents
and OOD bpd falls with them. The printed line names the step (and epoch) where AUROC peaks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch

import ood_lightning.run.config  # noqa: F401
from ood_lightning.core.checkpoints import SCRIPT_OPT_IN
from ood_lightning.data.datamodule import OODDataModule
from ood_lightning.evaluation.style import ID_COLOUR, legend, reference, save, styled
from ood_lightning.methods.lde.latent_flow import LatentFlowDetector
from ood_lightning.run.build import (
    build_model,
    load_weights,
    stored_config,
)
from ood_lightning.run.cli import exit_on_error
from ood_lightning.run.runtime import resolve_device
from ood_lightning.scoring.passes import extract

matplotlib.use("Agg")  # no display: figures go to files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, type=Path)
    ap.add_argument("--flow", default="glow")
    ap.add_argument("--n-blocks", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--normalize", default="l2", choices=["l2", "none"])
    ap.add_argument("--fit-limit", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("outputs/lde_undertraining.png"))
    ap.add_argument(SCRIPT_OPT_IN, action="store_true", help="build a stored config that names code outside the project (only for a file you trust)")
    args = ap.parse_args()

    cfg = stored_config(args.ckpt, args.allow_unsafe_checkpoint, opt_in=SCRIPT_OPT_IN)
    device = resolve_device(args.device)
    dm = OODDataModule(cfg.data, cfg.ood)
    dm.setup("test")
    model = build_model(cfg, dm.num_classes, pretrained=False)
    load_weights(model, args.ckpt, args.allow_unsafe_checkpoint)
    model.to(device).eval()
    prep = dm.preprocess.to(device)
    train = extract(model, dm.fit_dataloader(args.fit_limit), prep, device)
    sets = {"id_test": extract(model, dm.test_dataloader(), prep, device).features}
    for name, loader in dm.eval_dataloaders().items():
        if name not in ("id_val", "id_test"):
            sets[name] = extract(model, loader, prep, device).features
    det = LatentFlowDetector(flow=args.flow, n_blocks=args.n_blocks, normalize=args.normalize, lr=args.lr,
                             epochs=args.epochs, eval_every=args.eval_every, device=str(device))
    det.fit_with_history(model, train, eval_sets=sets)
    hist = det.history
    steps_per_epoch = max(1, len(train) // det.batch_size)
    ood = [k for k in sets if k != "id_test"]
    plot_history(hist, list(sets), steps_per_epoch, args.epochs, f"LDE ({args.flow}, {args.normalize})", args.out)
    args.out.with_suffix(".json").write_text(json.dumps(hist, indent=2))
    mean_auroc = [sum(h[f"auroc/{n}"] for n in ood) / len(ood) for h in hist]
    best = max(range(len(hist)), key=mean_auroc.__getitem__)
    print(f"mean AUROC peaks at step {hist[best]['step']} (epoch {hist[best]['step'] / steps_per_epoch:.2f}): "
          f"{mean_auroc[best]:.4f}; after {args.epochs} epochs: {mean_auroc[-1]:.4f}")
    print(f"wrote {args.out}")


@styled
def plot_history(hist: list[dict], sets: list[str], steps_per_epoch: int, epochs: int, title: str, out: Path) -> Path:
    """AUROC per OOD set and mean bpd per set against the flow's training steps (epochs dotted)."""
    ood = [k for k in sets if k != "id_test"]
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in ood:
        ax_a.plot([h["step"] for h in hist], [h[f"auroc/{name}"] for h in hist], label=name)
    for name in sets:
        ax_b.plot([h["step"] for h in hist], [h[f"bpd/{name}"] for h in hist], label=name,
                  **({"color": ID_COLOUR, "linewidth": 2.5} if name == "id_test" else {}))
    for ax in (ax_a, ax_b):
        for e in range(1, epochs + 1):
            reference(ax, x=e * steps_per_epoch)
        ax.set_xlabel("training steps (dotted: epochs)")
        legend(ax)
    ax_a.set(ylabel="AUROC (ID positive; 0.5 = chance)", title=f"{title}: AUROC vs training")
    ax_b.set(ylabel="bits per dimension", title="mean bpd per set")
    return save(fig, out)


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    exit_on_error(main)
