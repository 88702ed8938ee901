"""What the input-perturbation detectors cost, in forward-pass equivalents per input, and the pass
bound of the whole `experiment=posthoc_cifar10` preset that follows.

    OMP_NUM_THREADS=2 python benchmarks/perturbation_cost.py                     # published ResNet-56
    python benchmarks/perturbation_cost.py --backbone cifar_resnet20_pretrained --n 512

Rows, timed interleaved round by round in one process on the same preprocessed test images (a
shared machine slows them alike, so read the ratios):

  forward       ``model.forward_features`` under ``no_grad``: what one split's feature pass costs
  odin          ``ODIN.score_batch`` at ε > 0 (gradient of the NLL, then a second forward pass)
  mahalanobis*  ``Mahalanobis(layers=all).score_batch`` at ε > 0 (one forward, a gradient per layer,
                then a forward pass per layer on that layer's stepped input)

Printed: the median seconds per input of each row, their ratio to ``forward`` (forward-pass
equivalents), and the preset's bound = one pass per split + each perturbation detector's own
passes + their ε searches on the ID validation inputs, in forward-pass equivalents and in minutes
at this process's measured forward rate. Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from extraction_speed import setup as extraction_setup  # the same model, images and loader

from ood_lightning.detectors import ODIN, Mahalanobis
from ood_lightning.run.runtime import apply_eval_layout
from ood_lightning.scoring.loop import VAL_INPUTS
from ood_lightning.scoring.passes import extract

#: the preset's split sizes on CIFAR-10: fit, ID validation, ID test, seven OOD sets of 10,000
FIT, VAL, TEST, OOD = 45_000, 5_000, 10_000, 70_000


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="cifar_resnet56_pretrained", help="backbone preset (with its checkpoint)")
    p.add_argument("--n", type=int, default=512, help="first n CIFAR-10 test images (also the Gaussians' fit set)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--grid", type=int, default=6, help="ε values each search tries (method=lsgm: 6)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    cfg, model, loader, preprocess = extraction_setup(argparse.Namespace(tiny=False, backbone=args.backbone, n=args.n,
                                                                         batch_size=args.batch_size))
    apply_eval_layout(model, cfg, torch.device("cpu"))  # channels_last, as the evaluation on the CPU
    outputs = extract(model, loader, preprocess, "cpu")
    x = torch.cat([preprocess(b) for b, _ in loader])
    std = list(cfg.data.std)
    odin = ODIN(temperature=1000.0, epsilon=0.0025, input_std=std)
    maha = Mahalanobis(layers="all", epsilon=0.0025, input_std=std).fit_outputs(outputs)

    def forward(b):
        with torch.no_grad():
            return model.forward_features(b)

    rows = {"forward": forward, "odin": lambda b: odin.score_batch(model, b),
            "mahalanobis*": lambda b: maha.score_batch(model, b)}
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            start = time.perf_counter()
            for b in x.split(args.batch_size):
                fn(b)
            times[name].append((time.perf_counter() - start) / len(x))
    per_input = {k: statistics.median(v) for k, v in times.items()}
    equiv = {k: v / per_input["forward"] for k, v in per_input.items()}
    # ε search: one direction per validation input, then one stepped forward pass per grid value
    search = VAL_INPUTS * (equiv["odin"] - 1 + args.grid)
    passes = FIT + VAL + TEST + OOD
    scored = VAL + TEST + OOD
    bound = passes + scored * (equiv["odin"] + equiv["mahalanobis*"]) + 2 * search
    rate = 1 / per_input["forward"]
    print(f"{args.backbone}, {len(x)} test images, batch {args.batch_size}, {torch.get_num_threads()} torch thread(s), "
          f"{args.rounds} interleaved rounds (medians)")
    for k in rows:
        print(f"  {k:<13} {1e3 * per_input[k]:7.2f} ms/input  {equiv[k]:5.2f} forward-pass equivalents")
    print(f"preset bound: {passes:,} inputs of plain passes + {scored:,} scored by ODIN* and Mahalanobis* "
          f"+ two ε searches = {bound:,.0f} forward-pass equivalents")
    print(f"  = {bound / rate / 60:.1f} min at this process's forward rate ({rate:.0f} img/s); "
          f"without the two perturbation detectors {passes / rate / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps({"per_input_s": per_input, "forward_equivalents": equiv,
                                         "bound_forward_equivalents": bound, "forward_img_per_s": rate,
                                         "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
