"""Residual-flow training step: Neumann-series gradient vs backpropagation through the series.

    python benchmarks/flow_gradient.py                      # DHM's flow: 640-d, 10 blocks, batch 512
    python benchmarks/flow_gradient.py --dim 64 --batch-size 64 --steps 3

Both estimators draw the same Russian-roulette term counts (same seed). Reported per
training step (forward + backward of the NLL): ops dispatched (about one kernel launch each
on a GPU, counted by ``ood_lightning.core.host_sync``), median wall time, peak GPU memory, and the
ratios backprop / neumann, all from one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ood_lightning.core.host_sync import HostSyncCounter
from ood_lightning.nn.flows.residual import ResidualFlow


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=640)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--hidden", type=int, default=None, help="default: --dim")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, estimator: str) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    flow = ResidualFlow(args.dim, args.blocks, args.hidden or args.dim, grad_estimator=estimator).to(device).train()
    x = torch.rand(args.batch_size, args.dim, device=device) * 2 - 1

    def step():
        z, logdet = flow(x)
        (-(logdet - 0.5 * z.pow(2).sum(1)).mean()).backward()

    torch.manual_seed(1)  # the same roulette draws for both estimators
    ops = []
    for _ in range(args.steps):
        with HostSyncCounter() as counter:
            step()
        ops.append(counter.ops)
    torch.manual_seed(1)
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"ops": statistics.mean(ops), "seconds": statistics.median(times), "peak_gib": peak}


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = {est: measure(args, est) for est in ("backprop", "neumann")}
    dev = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {dev}; flow {args.dim}-d, {args.blocks} blocks, hidden {args.hidden or args.dim}; "
          f"batch {args.batch_size}; {args.steps} steps (ops: mean; time: median)\n")
    print("| gradient | ops/step | s/step | peak GPU GiB |\n|---|---:|---:|---:|")
    for est, r in res.items():
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"| {est} | {r['ops']:.0f} | {r['seconds']:.4f} | {peak} |")
    b, n = res["backprop"], res["neumann"]
    line = f"\nbackprop / neumann: ops {b['ops'] / n['ops']:.2f}x, time {b['seconds'] / n['seconds']:.2f}x"
    if b["peak_gib"] is not None:
        line += f", peak memory {b['peak_gib'] / n['peak_gib']:.2f}x"
    print(line)
    return res


if __name__ == "__main__":
    main()
