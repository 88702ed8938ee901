"""CPU speed of the framework against plain PyTorch, in one process, rows interleaved round by round:
training steps (a plain loop vs ``method=classifier`` and ``method=dhm`` through Lightning) and feature
extraction (a plain ``inference_mode`` loop vs the framework's ``split_outputs`` pass).

    OMP_NUM_THREADS=1 python benchmarks/cpu_speed.py                        # CIFAR ResNet-20, fp32 (+ bf16 with AMX)
    python benchmarks/cpu_speed.py --precisions fp32,bf16 --rounds 3 --markdown out.md
    python benchmarks/cpu_speed.py --tiny --steps 2 --rounds 1              # CI smoke run

Rows (the same model class, the same uint8 images in memory, the same batch size, augmentation
and precision/layout within each precision):

  plain       backbone + linear head, the method's SGD, ``dm.preprocess(x, train=True)`` (random
              crop + flip, normalisation) on batches indexed from the uint8 tensor; bf16: autocast
              + channels_last, as the framework does
  classifier  ``train.py``'s path: ``build_model`` + ``build_trainer`` (the default loggers and
              callbacks: CSV logger, cost projection, epoch progress, checkpoint), ``apply_speedups``,
              ``trainer=cpu`` with ``trainer.precision`` (``32-true`` / ``bf16-mixed``)
  dhm         the same with ``method=dhm`` (spectral norm, residual flow, two optimisers)
  plain_eval  ``with torch.inference_mode(): model(dm.preprocess(x))`` over the evaluation loader
  extract     ``scoring.loop.split_outputs`` (what ``score_and_write`` runs per split: logits, every
              pooled layer, labels), channels_last as the evaluation sets it, ``evaluation.precision``

Only steps after a warm-up are timed; a Lightning row is timed by a callback from the start of its
first timed batch to the end of its last, by the wall clock and by this process's CPU time. Printed:
the median images/s of each row (wall and per CPU second), the median of the per-round ratios
(classifier/plain >= 0.9, dhm/plain >= 0.75, extract/plain_eval >= 0.9; judged on CPU time, which other
jobs on a shared machine do not change) and the 1-min load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import lightning as L  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

from ood_lightning.core.cpu_runtime import fast_bf16  # noqa: E402
from ood_lightning.data.datamodule import OODDataModule  # noqa: E402
from ood_lightning.data.registry import ArrayData  # noqa: E402
from ood_lightning.run.build import build_model, build_trainer  # noqa: E402
from ood_lightning.run.runtime import (  # noqa: E402
    apply_eval_layout,
    apply_eval_precision,
    apply_speedups,
    set_nan_check_every,
)
from ood_lightning.scoring.loop import split_outputs  # noqa: E402
from tests.conftest import compose_cfg  # noqa: E402

TARGETS = {"classifier": ("plain", 0.9), "dhm": ("plain", 0.75), "extract": ("plain_eval", 0.9)}
TINY = ["backbone=cnn", "backbone.widths=[8,16]", "backbone.feature_dim=16", "method.flow.n_blocks=2",
        "method.flow.hidden=32"]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="cifar_resnet20")
    p.add_argument("--precisions", default="auto", help="fp32,bf16 or auto (bf16 only where the CPU has AMX)")
    p.add_argument("--rows", default="plain,classifier,dhm,plain_eval,extract")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=6, help="timed training steps per row and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument("--eval-images", type=int, default=2048, help="images per extraction pass")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a small CNN and flow (CI smoke run)")
    p.add_argument("--markdown", type=Path, help="append the table here")
    p.add_argument("--doc", type=Path, help="write the table into this page between its markers "
                   f"(<!-- {Path(__file__).stem}:begin/end -->), e.g. docs/performance.md")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(args.rows) - {"plain", "classifier", "dhm", "plain_eval", "extract"}
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}")
    if args.precisions == "auto":
        args.precisions = "fp32,bf16" if fast_bf16() else "fp32"
    args.precisions = [q.strip() for q in args.precisions.split(",")]
    if set(args.precisions) - {"fp32", "bf16"}:
        p.error("--precisions: fp32 and/or bf16")
    return args


def config(args, method: str, precision: str, run_dir: Path):
    overrides = ["data=cifar10", "ood=none", "detectors=none", "logger=csv", f"method={method}",
                 f"backbone={args.backbone}", "trainer=cpu", f"data.batch_size={args.batch_size}",
                 f"data.eval_batch_size={args.eval_batch_size}",
                 f"trainer.precision={'bf16-mixed' if precision == 'bf16' else '32-true'}",
                 f"evaluation.precision={precision}", "~callbacks.model_checkpoint"]
    if args.tiny:
        overrides += [o for o in TINY if method == "dhm" or not o.startswith("method.flow")]
    cfg = compose_cfg("train", overrides, run_dir)
    OmegaConf.resolve(cfg)  # this row's run folder, not the last composed one's
    return cfg


def data_module(cfg, images, labels) -> OODDataModule:
    dm = OODDataModule(cfg.data, cfg.ood)
    dm.train_set = ArrayData(images, labels)  # in memory, as setup() leaves a real split
    dm.val_set = dm.test_set = ArrayData(images[:len(images) // 4], labels[:len(images) // 4])
    return dm


def _clocks() -> tuple[float, float]:
    """(wall, this process's CPU seconds): on a shared machine the CPU time is what the row itself
    cost; the wall time adds whatever the other jobs took from it."""
    return time.perf_counter(), time.process_time()


def _rates(n: int, start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    return n / (end[0] - start[0]), n / (end[1] - start[1])


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = _clocks()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = _clocks()


class Row:
    """One row's state, built once and run once per round (so rounds interleave the rows)."""

    def __init__(self, name: str, precision: str, args, images, labels, run_dir: Path):
        self.name, self.precision, self.args = name, precision, args
        method = "dhm" if name == "dhm" else "classifier"
        self.cfg = config(args, method, precision, run_dir / f"{name}-{precision}")
        torch.manual_seed(0)
        self.dm = data_module(self.cfg, images, labels)
        self.model = build_model(self.cfg, 10)
        self.bf16 = precision == "bf16"
        self.layout = torch.channels_last if self.bf16 else torch.contiguous_format
        if name == "plain":
            net = nn.Sequential(self.model.backbone, self.model.head).to(memory_format=self.layout)
            self.net = net
            self.opt = instantiate(self.cfg.method.optimizer)(net.parameters())
            self.prep = self.dm.preprocess
            self.images, self.labels = images, labels
        elif name in ("plain_eval", "extract"):
            self.model.eval()
            if name == "extract":
                apply_eval_layout(self.model, self.cfg, torch.device("cpu"))
                apply_eval_precision(self.model, self.cfg, torch.device("cpu"))
            else:
                self.model.to(memory_format=torch.channels_last)  # the evaluation's CPU layout
            n = min(args.eval_images, len(images))
            self.dm.test_set = ArrayData(images[:n], labels[:n])
            self.loader = self.dm.test_dataloader()

    def run(self) -> tuple[float, float]:
        """(images per wall second, images per CPU second) of one round."""
        return {"plain": self._plain, "classifier": self._lightning, "dhm": self._lightning,
                "plain_eval": self._plain_eval, "extract": self._extract}[self.name]()

    def _plain(self) -> tuple[float, float]:
        bs, n = self.args.batch_size, len(self.labels)
        self.net.train()

        def step(i):
            idx = torch.randint(0, n, (bs,))
            x = self.prep(self.images[idx], train=True).contiguous(memory_format=self.layout)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                loss = F.cross_entropy(self.net(x), self.labels[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            loss.item()  # the framework reads the loss every step on the CPU (nan_check_every)

        for i in range(self.args.warmup):
            step(i)
        t0 = _clocks()
        for i in range(self.args.steps):
            step(i)
        return _rates(self.args.steps * bs, t0, _clocks())

    def _lightning(self) -> tuple[float, float]:
        timer = _Timer(self.args.warmup)
        total = self.args.warmup + self.args.steps
        with open_dict(self.cfg):
            self.cfg.trainer.max_epochs = 1
            self.cfg.trainer.limit_train_batches = total
            self.cfg.trainer.limit_val_batches = 0
        trainer, _ = build_trainer(self.cfg, self.model, self.dm, extra_callbacks=[timer])
        apply_speedups(self.model, self.cfg, trainer.strategy.root_device)
        set_nan_check_every(self.model, self.cfg, trainer.strategy.root_device)
        trainer.fit(self.model, datamodule=self.dm)
        return _rates(self.args.steps * self.args.batch_size, timer.start, timer.end)

    def _plain_eval(self) -> tuple[float, float]:
        t0, n = _clocks(), 0
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            for x, _ in self.loader:
                self.model(self.dm.preprocess(x).contiguous(memory_format=torch.channels_last))
                n += len(x)
        return _rates(n, t0, _clocks())

    def _extract(self) -> tuple[float, float]:
        t0 = _clocks()
        out = split_outputs(self.model, self.dm, "id_test", self.loader, self.dm.preprocess, torch.device("cpu"))
        return _rates(len(out.labels), t0, _clocks())


def measure(args) -> dict:
    side = 16 if args.tiny else 32
    n = max(args.eval_images, args.batch_size * 8)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    results: dict = {"load_before": os.getloadavg()[0], "threads": torch.get_num_threads(), "rates": {}, "cpu_rates": {}}
    with tempfile.TemporaryDirectory() as tmp:
        rows = [Row(name, precision, args, images, labels, Path(tmp)) for precision in args.precisions
                for name in args.rows]
        for r in range(args.rounds):
            for row in rows:
                rate, cpu_rate = row.run()
                results["rates"].setdefault(f"{row.name}/{row.precision}", []).append(rate)
                results["cpu_rates"].setdefault(f"{row.name}/{row.precision}", []).append(cpu_rate)
                print(f"round {r + 1} {row.name:<10} {row.precision}: {rate:,.1f} images/s, {cpu_rate:,.1f} images "
                      f"per CPU second (load {os.getloadavg()[0]:.1f})", flush=True)
    results["load_after"] = os.getloadavg()[0]
    return results


def _ratio(rates: dict, name: str, precision: str) -> tuple[str, float | None]:
    base = TARGETS[name][0] if name in TARGETS else None
    if base is None or f"{base}/{precision}" not in rates:
        return "", None
    value = statistics.median(a / b for a, b in zip(rates[f"{name}/{precision}"], rates[f"{base}/{precision}"]))
    return f"{value:.2f}", value


def report(args, results: dict) -> str:
    rates, cpu = results["rates"], results["cpu_rates"]
    model = "tiny CNN 16x16" if args.tiny else args.backbone
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {model}, batch {args.batch_size} "
             f"(extraction {args.eval_batch_size}, {args.eval_images} images); {results['threads']} torch thread(s); "
             f"{args.rounds} round(s) x {args.steps} timed steps; load average {results['load_before']:.1f} -> "
             f"{results['load_after']:.1f} on {os.cpu_count()} cores", "",
             "| precision | row | images/s | images per CPU s | ratio (wall) | ratio (CPU time) | target (on CPU time) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for precision in args.precisions:
        for name in args.rows:
            key = f"{name}/{precision}"
            if key not in rates:
                continue
            wall, _ = _ratio(rates, name, precision)
            text, value = _ratio(cpu, name, precision)
            target = ""
            if value is not None:
                goal = TARGETS[name][1]
                target = f"{TARGETS[name][0]} x {goal}: {'met' if value >= goal else 'MISSED'}"
            lines.append(f"| {precision} | {name} | {statistics.median(rates[key]):,.1f} | "
                         f"{statistics.median(cpu[key]):,.1f} | {wall} | {text} | {target} |")
    lines.append("\nRatios are medians over rounds of row / baseline (plain loop for training, plain inference for "
                 "extraction). The CPU-time ratio counts this process's own CPU seconds (one thread), so other jobs on "
                 "the machine do not enter it; the wall ratio does.")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse(argv)
    results = measure(args)
    text = report(args, results)
    print("\n" + text)
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write(text + "\n\n")
    if args.doc:
        from doc_block import write_block

        write_block(args.doc, "cpu_speed", f"`python benchmarks/cpu_speed.py {' '.join(sys.argv[1:] if argv is None else argv)}`:\n\n{text}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=1))
    return results


if __name__ == "__main__":
    main()
