"""LSGM scoring cost against the number of mixture components and of layers (paper Fig. 7).

The forward algorithm costs O(N · m · k²) for the transitions plus O(N · m · k · D²) for the
emissions, so at fixed k the time is linear in the number of layers m. This script times
``LSGM.score`` on features (synthetic Gaussian-mixture traces by default, or the cached
outputs of a run: ``--scores-from`` is not needed, the cost does not depend on the values)
and plots seconds per 1000 inputs.

    python sweeps/lsgm_cost.py --out docs/figures/lsgm_cost.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch

from ood_lightning.detectors.lsgm import scoring_time
from ood_lightning.evaluation.style import legend, save, styled
from ood_lightning.scoring.api import Outputs

matplotlib.use("Agg")  # no display: figures go to files


def synthetic_outputs(n: int, n_layers: int, dim: int, n_classes: int = 10, seed: int = 0) -> Outputs:
    """Layer features whose cluster depends on the class, like a trained network's blocks."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % n_classes
    layers = {}
    for i in range(n_layers):
        centres = 3 * torch.randn(n_classes, dim, generator=g)
        layers[f"block{i + 1}"] = centres[labels] + torch.randn(n, dim, generator=g)
    feats = layers[f"block{n_layers}"]
    return Outputs(logits=torch.zeros(n, n_classes), features=feats, layers=layers, labels=labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--components", type=int, nargs="+", default=[10, 25, 50, 100])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("outputs/lsgm_cost.png"))
    args = ap.parse_args()
    train = synthetic_outputs(args.n_train, args.layers, args.dim)
    test = synthetic_outputs(args.n_test, args.layers, args.dim, seed=1)
    # fitting is not timed; a diagonal EM fit keeps the study quick
    rows = scoring_time(train, test, n_components=args.components, repeats=3, mixture="gmm",
                        covariance_type="diag", max_iter=20)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    plot_cost(rows, args.components, args.out)
    for r in rows:
        print(f"k={r['n_components']:4d} m={r['n_layers']} {1e6 * r['seconds_per_input']:.1f} µs/input")
    print(f"wrote {args.out}")


@styled
def plot_cost(rows: list[dict], components: list[int], out: Path) -> Path:
    """Scoring time per 1000 inputs against k (one line per m) and against m (one line per k)."""
    fig, (ax_k, ax_m) = plt.subplots(1, 2, figsize=(9, 3.4))
    for m in sorted({r["n_layers"] for r in rows}):
        sel = [r for r in rows if r["n_layers"] == m]
        ax_k.plot([r["n_components"] for r in sel], [1e6 * r["seconds_per_input"] for r in sel], "o-", label=f"{m} layers")
    for k in components:
        sel = [r for r in rows if r["n_components"] == k]
        ax_m.plot([r["n_layers"] for r in sel], [1e6 * r["seconds_per_input"] for r in sel], "o-", label=f"k={k}")
    ax_k.set(xlabel="components per layer k", ylabel="scoring time (ms per 1000 inputs)", title="LSGM scoring cost vs k")
    ax_m.set(xlabel="layers m", ylabel="scoring time (ms per 1000 inputs)", title="LSGM scoring cost vs m")
    legend(ax_k)
    legend(ax_m)
    return save(fig, out)


if __name__ == "__main__":
    main()
