"""CPU threads and OpenMP wait policy: training and inference images/s of a CIFAR ResNet-20 at 1 and
2 intra-op threads under each ``OMP_WAIT_POLICY``, idle and under load, with the load average.

    python benchmarks/cpu_threads.py                         # as the machine is now
    python benchmarks/cpu_threads.py --load 2 --rounds 2     # plus 2 busy one-thread processes
    python benchmarks/cpu_threads.py --markdown docs/figures/cpu_threads.md

OpenMP reads ``OMP_WAIT_POLICY`` once, when the runtime starts, so every setting runs in a child
process of its own (started fresh, settings interleaved round by round). ``--load K`` starts K
one-thread matrix-multiply loops beside the measurement (another job on the same cores) and stops
them at the end. Each row gives images/s of a training step (batch 128, SGD, random crop + flip of
uint8 images, the same preprocessing as the framework's) and of inference (batch 256), in fp32 NCHW
and bf16 autocast + channels_last, and the 1-minute load average read before the child started.
The chosen default is in ``ood_lightning/cpu_threads.py``; the figures are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = [  # (threads, OMP_WAIT_POLICY or None = the runtime's default)
    (1, None),
    (2, None),
    (2, "PASSIVE"),
    (2, "ACTIVE"),
]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds over the settings")
    p.add_argument("--load", type=int, default=0, help="busy one-thread processes to run beside (0 = none)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per figure (at least 2 steps)")
    p.add_argument("--markdown", type=Path, help="append the table here")
    p.add_argument("--doc", type=Path, help="write the table into this page between its markers "
                   f"(<!-- {Path(__file__).stem}:begin/end -->), e.g. docs/performance.md")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--from-json", type=Path, help="measure nothing: the table of a recorded --json run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help="a small CNN on 16x16 images (CI smoke run)")
    p.add_argument("--precisions", default="auto",
                   help="fp32,bf16_cl or auto (bf16 + channels_last only where the CPU has fast bf16: "
                        "ood_lightning.core.cpu_runtime.fast_bf16)")
    return p.parse_args(argv)


# -- child: one setting -------------------------------------------------------------------------------
def child(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from ood_lightning.data.transforms import Preprocess
    from ood_lightning.nn.backbones import SmallCNN, cifar_resnet20

    torch.manual_seed(0)
    side = 16 if args.tiny else 32
    images = torch.randint(0, 256, (512, 3, side, side), dtype=torch.uint8)
    labels = torch.randint(0, 10, (512,))
    prep = Preprocess([0.49, 0.48, 0.45], [0.25, 0.24, 0.26], crop_padding=4, hflip=True)
    out = {"threads": torch.get_num_threads()}
    for fast in [p == "bf16_cl" for p in args.precisions.split(",")]:
        backbone = SmallCNN(in_channels=3, widths=(8, 16), feature_dim=16) if args.tiny else cifar_resnet20()
        model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.feature_dim, 10))
        name = "bf16_cl" if fast else "fp32"
        out[f"train_{name}"], out[f"infer_{name}"] = _rates(model, fast, images, labels, prep, args.seconds)
    return out


def _rates(model, fast: bool, images, labels, prep, seconds: float) -> tuple[float, float]:
    """Images/s of training steps (batch 128) and of inference (batch 256)."""
    import torch
    import torch.nn.functional as F

    layout = torch.channels_last if fast else torch.contiguous_format
    model = model.to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step(i):
        idx = torch.arange(i * 128, (i + 1) * 128) % len(labels)
        x = prep(images[idx], train=True).contiguous(memory_format=layout)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return 128

    def infer_step(i):
        idx = torch.arange(i * 256, (i + 1) * 256) % len(labels)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            model(prep(images[idx]).contiguous(memory_format=layout))
        return 256

    model.train()
    train = _rate(train_step, seconds)
    model.eval()
    return train, _rate(infer_step, seconds)


def _rate(step, seconds: float) -> float:
    for i in range(2):  # warm-up: oneDNN primitive creation
        step(i)
    n, i, t0 = 0, 0, time.perf_counter()
    while i < 2 or time.perf_counter() - t0 < seconds:
        n += step(i)
        i += 1
    return n / (time.perf_counter() - t0)


# -- parent -------------------------------------------------------------------------------------------
BURNER = ("import torch, time\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\n"
          "while True:\n    a = torch.tanh(a @ a.T / 512)\n")


def run_setting(threads: int, policy: str | None, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("OOD_LIGHTNING_THREADS", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    load_before = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--child", "--seconds", str(args.seconds), "--precisions", args.precisions] + \
        (["--tiny"] if args.tiny else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    fig = json.loads(res.stdout.strip().splitlines()[-1])
    return {"threads": threads, "wait_policy": policy or "default", "load_1min": load_before,
            "loaded_with": args.load, **{k: v for k, v in fig.items() if k != "threads"}}


def table(rows: list[dict]) -> str:
    cols = ["train_fp32", "train_bf16_cl", "infer_fp32", "infer_bf16_cl"]
    lines = ["| threads | OMP_WAIT_POLICY | busy jobs added | load avg (1 min) | train fp32 | train bf16+CL "
             "| infer fp32 | infer bf16+CL |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    keyed: dict[tuple, list[dict]] = {}
    for r in rows:
        keyed.setdefault((r["threads"], r["wait_policy"], r["loaded_with"]), []).append(r)
    for (threads, policy, load), group in keyed.items():
        med = [statistics.median(g.get(c, float("nan")) for g in group) for c in cols]
        loads = ", ".join(f"{g['load_1min']:.1f}" for g in group)
        lines.append(f"| {threads} | {policy} | {load} | {loads} | " + " | ".join("-" if m != m else f"{m:.0f}" for m in med) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse(argv)
    if args.precisions == "auto":
        sys.path.insert(0, str(ROOT))
        from ood_lightning.core.cpu_runtime import fast_bf16

        args.precisions = "fp32,bf16_cl" if fast_bf16() else "fp32"
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.from_json:
        recorded = json.loads(args.from_json.read_text())
        rows = recorded["rows"] if isinstance(recorded, dict) else recorded
        when = recorded.get("date", "") if isinstance(recorded, dict) else ""
        report(args, rows, f"recorded in {args.from_json.name} {when}".strip(), argv)
        return
    burners = [subprocess.Popen([sys.executable, "-c", BURNER], env={**os.environ, "OMP_NUM_THREADS": "1"})
               for _ in range(args.load)]
    try:
        if burners:
            time.sleep(5)  # let them start
        rows = []
        for _ in range(args.rounds):
            for threads, policy in SETTINGS:
                rows.append(run_setting(threads, policy, args))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for b in burners:
            b.terminate()
            b.wait()
    when = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    report(args, rows, when, argv)
    if args.json:
        command = "python benchmarks/cpu_threads.py " + " ".join(sys.argv[1:] if argv is None else argv)
        args.json.write_text(json.dumps({"date": when, "command": command, "rows": rows}, indent=1))


def report(args, rows: list[dict], when: str, argv) -> None:
    md = table(rows)
    rounds = max(len([r for r in rows if (r["threads"], r["wait_policy"]) == key]) for key in
                 {(r["threads"], r["wait_policy"]) for r in rows})
    header = (f"{when}, {os.cpu_count()} cores, {'tiny CNN 16x16' if args.tiny else 'CIFAR ResNet-20'}, images/s "
              f"(median of {rounds} round(s); each setting in a fresh process)")
    print(header + "\n\n" + md)
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write(header + "\n\n" + md + "\n\n")
    if args.doc:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from doc_block import write_block

        write_block(args.doc, "cpu_threads", f"`python benchmarks/cpu_threads.py {' '.join(sys.argv[1:] if argv is None else argv)}`, "
                    f"{header}:\n\n{md}")


if __name__ == "__main__":
    main()
