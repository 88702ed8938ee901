"""Feature-extraction speed (images/s) of the framework's pass against a plain PyTorch loop, in one
process, on the same tensors and model, with channels_last off and on.

    OMP_NUM_THREADS=1 python benchmarks/extraction_speed.py                      # published ResNet-56, 2,000 test images
    python benchmarks/extraction_speed.py --backbone cifar_resnet20_pretrained --n 1000 --rounds 2
    python benchmarks/extraction_speed.py --tiny                                 # small random CNN, no ../shared (CI)

Rows, timed interleaved round by round (so a machine shared with other jobs slows them alike):

  framework  ``ood_lightning.scoring.passes.extract`` (what the scoring loop and the feature cache
             call) over the data module's evaluation ``DataLoader``: logits, every pooled stage, labels
  plain      ``with torch.inference_mode(): model(preprocess(x))`` over the same uint8 batches, keeping the logits

each with the backbone NCHW and channels_last (``apply_speedups(channels_last=true)``). Printed:
torch's thread count, median images/s per row, and the medians of the per-round ratios
framework/plain (target >= 0.9) and channels_last/NCHW. Figures only, no assertions: read the
ratios, not the absolute speeds, on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ood_lightning.run.build import build_data, build_model
from ood_lightning.run.config import compose
from ood_lightning.run.runtime import apply_speedups
from ood_lightning.scoring.passes import extract

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data=stripes", "ood=diagonal_stripes", "backbone=cnn", "backbone.widths=[8,16]", "backbone.feature_dim=16",
        "data.n_train=300", "data.n_test=200", "data.val_size=100"]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="cifar_resnet56_pretrained", help="backbone preset (with its checkpoint)")
    p.add_argument("--n", type=int, default=2000, help="first n CIFAR-10 test images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each times every row once)")
    p.add_argument("--tiny", action="store_true", help="a small random CNN on synthetic data (CI smoke run)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def setup(args):
    """The model (weights loaded, eval mode), the evaluation DataLoader over the first ``n`` ID
    test images, and the data module's preprocessing: as ``score_and_write`` gets them."""
    overrides = TINY if args.tiny else ["data=cifar10", "ood=odin", f"backbone={args.backbone}"]
    cfg = compose("train", [*overrides, "method=classifier", "trainer=cpu", "logger=csv",
                            f"data.eval_batch_size={args.batch_size}", "data.num_workers=0"],
                  Path(tempfile.mkdtemp(prefix="extraction_speed_")), ROOT / "conf")
    dm = build_data(cfg)
    test = dm.id_split("test")  # the test pack only: setup() would decode the 50k training images too
    test = test.subset(torch.arange(min(args.n, len(test))))
    loader = dm.dataloader(test, train=False)  # the evaluation loader the scoring loop uses on the CPU
    model = build_model(cfg, len(test.classes) or int(test.labels.max()) + 1, pretrained=not args.tiny).eval()
    return cfg, model, loader, dm.preprocess


def framework(model, loader, pre) -> torch.Tensor:
    return extract(model, loader, pre, "cpu").logits


def plain(model, loader, pre) -> torch.Tensor:
    batches = loader.bench_batches  # the same uint8 tensors, fetched once
    with torch.inference_mode():
        return torch.cat([model(pre(x)) for x in batches])


def run(args) -> dict:
    cfg, model, loader, pre = setup(args)
    loader.bench_batches = [x for x, _ in loader]
    layouts = {"nchw": model, "channels_last": copy.deepcopy(model)}
    applied = apply_speedups(layouts["channels_last"], OmegaConf.create({"channels_last": True}), torch.device("cpu"))
    n = len(loader.dataset)
    rows = {f"{path}/{layout}": [] for layout in layouts for path in ("framework", "plain")}
    reference = plain(model, loader, pre)
    for name in rows:  # warm-up (oneDNN primitive caches), and every row computes the same logits
        path, layout = name.split("/")
        logits = (framework if path == "framework" else plain)(layouts[layout], loader, pre)
        if not torch.allclose(logits, reference, atol=1e-3, rtol=1e-3):
            raise RuntimeError(f"{name} gives other logits than plain/nchw (max diff "
                               f"{(logits - reference).abs().max():.3g})")
    for _ in range(args.rounds):
        for name in rows:
            path, layout = name.split("/")
            start = time.perf_counter()
            (framework if path == "framework" else plain)(layouts[layout], loader, pre)
            rows[name].append(n / (time.perf_counter() - start))
    ratio = {layout: statistics.median(f / p for f, p in zip(rows[f"framework/{layout}"], rows[f"plain/{layout}"]))
             for layout in layouts}
    speedup = {path: statistics.median(c / d for c, d in zip(rows[f"{path}/channels_last"], rows[f"{path}/nchw"]))
               for path in ("framework", "plain")}
    return {"backbone": "tiny cnn" if args.tiny else args.backbone, "images": n, "batch_size": args.batch_size,
            "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "channels_last_applied": applied["channels_last"],
            "images_per_s": {k: statistics.median(v) for k, v in rows.items()},
            "framework_over_plain": ratio, "channels_last_speedup": speedup}


def report(res: dict) -> str:
    lines = [f"{res['backbone']}: {res['images']} images, batch {res['batch_size']}, {res['rounds']} interleaved rounds, "
             f"torch {res['torch']}, {res['torch_threads']} torch thread(s)",
             "| row | images/s (median) |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in res["images_per_s"].items()]
    lines += [f"framework/plain: NCHW {res['framework_over_plain']['nchw']:.3f}, "
              f"channels_last {res['framework_over_plain']['channels_last']:.3f} (target >= 0.9)",
              f"channels_last/NCHW: framework {res['channels_last_speedup']['framework']:.3f}x, "
              f"plain {res['channels_last_speedup']['plain']:.3f}x"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse(argv)
    res = run(args)
    print(report(res), flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
