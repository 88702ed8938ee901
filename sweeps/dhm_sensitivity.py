"""Sensitivity and smoothness of a trained extractor (DHM paper §4.5, Table 2).

Loads a checkpoint written by train.py (its config is stored inside), perturbs ID test inputs
with random δ of growing norm and fits feature deviation ‖g(f(x+δ)) − g(f(x))‖₂ against ‖δ‖₂ for
every feature normalisation g (none, l1, l2, l∞): slope and Pearson r
(ood_lightning/methods/dhm/sensitivity.py). Prints the table and writes sensitivity.md/.json next
to the checkpoint's run directory (or --out).

    python sweeps/dhm_sensitivity.py <run_dir>/checkpoints/last.ckpt
    python sweeps/dhm_sensitivity.py <ckpt> --n 512 --max-norm 2.0 --levels 21

Several checkpoints (e.g. c = 1 ... 6 of a spectral sweep) give one table each, in order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ood_lightning.core.checkpoints import SCRIPT_OPT_IN
from ood_lightning.data.datamodule import OODDataModule
from ood_lightning.methods.dhm.sensitivity import sensitivity, to_markdown
from ood_lightning.run.build import build_model, load_weights, stored_config
from ood_lightning.run.cli import exit_on_error
from ood_lightning.run.runtime import resolve_device


def run(ckpt: Path, n: int, max_norm: float | None, levels: int, seed: int, device: str,
        allow_unsafe: bool = False) -> tuple[str, dict]:
    cfg = stored_config(ckpt, allow_unsafe, opt_in=SCRIPT_OPT_IN)
    dm = OODDataModule(cfg.data, None)
    dm.setup("test")
    model = build_model(cfg, dm.num_classes, pretrained=False)
    load_weights(model, ckpt, allow_unsafe)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    x = dm.preprocess.to(dev)(dm.test_set.images[:n].to(dev))
    if max_norm is None:  # up to 10% of the inputs' mean l2 norm
        max_norm = 0.1 * float(x.flatten(1).norm(dim=1).mean())
    rows = sensitivity(model.backbone, x, max_norm=max_norm, n_norms=levels, seed=seed)
    sc = (cfg.get("method") or {}).get("spectral_coeff", (cfg.get("backbone") or {}).get("spectral_coeff"))
    title = (f"**{ckpt}** ({cfg.data.name}, spectral_coeff={sc}, lambda={cfg.get('lambda')}; {len(x)} inputs, "
             f"‖δ‖₂ in [0, {max_norm:.3g}], {levels} levels)")
    return to_markdown(rows, title), {"checkpoint": str(ckpt), "max_norm": max_norm, "spectral_coeff": sc,
                                      "lambda": cfg.get("lambda"), "rows": {k: r.as_dict() for k, r in rows.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", type=Path, nargs="+")
    ap.add_argument("--n", type=int, default=256, help="ID test inputs to perturb")
    ap.add_argument("--max-norm", type=float, default=None, help="largest ‖δ‖₂ (default: 0.1 x mean ‖x‖₂)")
    ap.add_argument("--levels", type=int, default=11, help="perturbation norms from 0 to --max-norm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="folder for sensitivity.md/.json")
    ap.add_argument(SCRIPT_OPT_IN, action="store_true", help="build a stored config that names code outside the project (only for a file you trust)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    texts, payload = [], []
    for ckpt in args.checkpoints:
        text, result = run(ckpt, args.n, args.max_norm, args.levels, args.seed, args.device,
                            args.allow_unsafe_checkpoint)
        print(text)
        texts.append(text)
        payload.append(result)
    out = args.out or args.checkpoints[0].resolve().parent.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.md").write_text("\n".join(texts))
    (out / "sensitivity.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {out / 'sensitivity.md'} and {out / 'sensitivity.json'}")


if __name__ == "__main__":
    exit_on_error(main)
