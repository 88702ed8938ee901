"""One VMDLS training step of ``experiment=vmdls_mnist`` (10 classes x 20 MNIST-sized images through
the CROSR CNN, stochastic head, triplet + distancing + KL, the autoencoder, both Adam steps), with
the backbone NCHW and channels_last, timed interleaved round by round in one process.

    OMP_NUM_THREADS=1 python benchmarks/vmdls_step.py                 # 5 rounds of 2 steps per layout
    python benchmarks/vmdls_step.py --rounds 2 --steps 1

Printed: the step's FLOPs (torch's FlopCounterMode), this process's float32 matmul rate (a
1024x1024 sgemm), so the compute-bound floor FLOPs / rate, then per layout the median wall and
CPU seconds per step, and the median of the per-round ratio NCHW / channels_last (CPU time).
On a shared machine read CPU seconds and ratios, not wall seconds. Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ood_lightning.run.build import build_model  # noqa: E402
from ood_lightning.run.runtime import apply_speedups  # noqa: E402
from tests.conftest import compose_cfg  # noqa: E402


def build(channels_last: bool, out: Path):
    """The preset's model (untrained, seeded) with its two optimisers, NCHW or channels_last."""
    cfg = compose_cfg("train", ["experiment=vmdls_mnist", f"channels_last={str(channels_last).lower()}"], out)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=10, pretrained=False)
    apply_speedups(model, cfg, torch.device("cpu"))
    opts = model.configure_optimizers()
    opts = opts[0] if isinstance(opts, tuple) else opts
    return model, opts


def step(model, opts, x, y) -> None:
    """What VMDLS.training_step computes, without the Lightning loop around it."""
    mu, logvar = model.latent(model.backbone(x))
    z = model.latent.sample(mu, logvar)
    terms = model.loss_terms(z, mu, logvar, y)
    total = sum(model.weights[k] * v for k, v in terms.items()) + F.mse_loss(model.autoencoder(x), x)
    for opt in opts:
        opt.zero_grad()
    total.backward()
    for opt in opts:
        opt.step()


def timed(fn, steps: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per layout per round")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(200, 1, 28, 28)
    y = torch.arange(10).repeat_interleave(20)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"NCHW": build(False, Path(tmp) / "a"), "channels_last": build(True, Path(tmp) / "b")}
    model, opts = rows["NCHW"]
    with FlopCounterMode(display=False) as counter:
        step(model, opts, x, y)
    flops = counter.get_total_flops()
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    _, gemm_cpu = timed(lambda: a @ b, 20)
    rate = 2 * 1024 ** 3 / gemm_cpu
    print(f"threads {torch.get_num_threads()}; step {flops / 1e9:.0f} GFLOP; sgemm {rate / 1e9:.0f} GFLOP/s (CPU time); "
          f"compute-bound floor {flops / rate:.2f} CPU s/step")
    for model, opts in rows.values():  # warm-up
        step(model, opts, x, y)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, (model, opts) in rows.items():
            times[name].append(timed(lambda m=model, o=opts: step(m, o, x, y), args.steps))
    for name, ts in times.items():
        print(f"{name:14s} wall {statistics.median(t[0] for t in ts):6.2f} s/step   CPU {statistics.median(t[1] for t in ts):6.2f} s/step")
    ratio = statistics.median(a[1] / b[1] for a, b in zip(times["NCHW"], times["channels_last"]))
    print(f"NCHW / channels_last (CPU time, median of {args.rounds} rounds): {ratio:.2f}")


if __name__ == "__main__":
    main()
