"""Training throughput (images/s) of ood-lightning against a plain PyTorch loop, in one process.

    make bench                                   # python benchmarks/throughput.py
    python benchmarks/throughput.py --batch-size 256 --json out.json --profile prof/

Rows (the same batch size, random CIFAR-shaped uint8 data already on the device, the same
batched crop/flip/normalisation; steps after ``--warmup`` only, so compilation is excluded):

  a0  plain PyTorch, one fixed pre-normalised batch (the issue's reference setup)
  a   plain PyTorch: WRN-28-10 + linear head, SGD, data on the device, the same augmentation
  b   method=classifier through Lightning (train.py's build_model + trainer=gpu + DeviceLoader)
  c   method=dhm through Lightning (spectral norm c=3, 10-block residual flow, two optimisers)

On CUDA: WRN-28-10, bf16 autocast / ``bf16-mixed``, channels_last, ``torch.compile`` (the
whole model in a; the backbone only in b and c, see docs/performance.md) and cudnn.benchmark.
Without CUDA the same code runs a tiny CNN on tiny data in fp32 without compile (``--compile``
to force it), so CI exercises the script; its numbers say nothing about the GPU targets.

Reported: images/s, b/a and c/a, the projected time of ``--epochs`` epochs over
``--dataset-size`` images (training steps only: no validation or OOD evaluation), and peak
GPU memory per row. ``--profile DIR`` writes a torch.profiler table per row (a few steps
after warm-up, before the timed window) for finding where the time goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict
from torch import nn

import ood_lightning.run.config  # noqa: F401  (resolvers)
from ood_lightning.core.host_sync import CountHostSyncs
from ood_lightning.data.datamodule import OODDataModule
from ood_lightning.data.registry import ArrayData
from ood_lightning.data.transforms import Preprocess
from ood_lightning.nn.backbones import SmallCNN, WideResNet
from ood_lightning.run.build import build_model
from ood_lightning.run.runtime import apply_speedups, set_nan_check_every

ROOT = Path(__file__).resolve().parents[1]

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
NUM_CLASSES = 10


# -- settings ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--rows", default="a0,a,b,c", help="comma-separated subset of a0,a,b,c")
    p.add_argument("--batch-size", type=int, help="default 512 on CUDA (the issue's reference), 64 on CPU")
    p.add_argument("--warmup", type=int, help="untimed steps first (compilation, cudnn autotuning); CUDA 25, CPU 3")
    p.add_argument("--steps", type=int, help="timed steps; CUDA 60, CPU 20")
    p.add_argument("--images", type=int, help="images held on the device (random uint8); CUDA 50000")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="torch.compile (CUDA default)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--threads", type=int, default=1, help="CPU threads without CUDA (default 1: stable on shared cores)")
    p.add_argument("--epochs", type=int, default=200, help="for the projected time")
    p.add_argument("--dataset-size", type=int, default=50000, help="images per epoch for the projection (CIFAR-10)")
    p.add_argument("--profile", type=Path, help="write a profiler table per row into this folder")
    p.add_argument("--json", type=Path, help="write the results as JSON here too")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    args.device = torch.device("cuda" if cuda else "cpu")
    args.tiny = not cuda
    defaults = dict(batch_size=64, warmup=3, steps=20, compile=False) if args.tiny else \
        dict(batch_size=512, warmup=25, steps=60, compile=True)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    need = (args.warmup + args.steps + (3 if args.profile else 0)) * args.batch_size
    args.images = max(args.images or (2048 if args.tiny else 50000), need)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(args.rows) - {"a0", "a", "b", "c"}
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; choose from a0,a,b,c")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_options(args) -> dict | bool:
    if not args.compile:
        return False
    return {"mode": args.compile_mode} if args.compile_mode else True


# -- a / a0: plain PyTorch -------------------------------------------------------------------------
class PlainNet(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.backbone(x))


def plain_backbone(args) -> nn.Module:
    return SmallCNN(in_channels=3, widths=(8, 16), feature_dim=16) if args.tiny else WideResNet(28, 10)


def run_plain(args, images, labels, fixed_batch: bool, profile_dir: Path | None) -> dict:
    device = args.device
    torch.manual_seed(0)
    model = PlainNet(plain_backbone(args)).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    step_fn = model
    if args.compile:
        step_fn = torch.compile(model, **({"mode": args.compile_mode} if args.compile_mode else {}))
    prep = Preprocess(CIFAR_MEAN, CIFAR_STD, crop_padding=4, hflip=True).to(device)
    n, bs = len(labels), args.batch_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    perm = torch.randperm(n, generator=gen).to(device)
    fixed = (prep(images[:bs], train=True), labels[:bs])
    cursor = 0

    def batch():
        nonlocal perm, cursor
        if fixed_batch:
            return fixed
        if cursor + bs > n:
            perm, cursor = torch.randperm(n, generator=gen).to(device), 0
        idx = perm[cursor:cursor + bs]
        cursor += bs
        return prep(images[idx], train=True), labels[idx]

    def step():
        x, y = batch()
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(step_fn(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(args.warmup):
        step()
    if profile_dir is not None:
        with _profiler(device) as prof:
            t0 = time.perf_counter()
            for _ in range(3):
                step()
            sync(device)
            wall = time.perf_counter() - t0
        _write_profile(prof, profile_dir, "a0" if fixed_batch else "a", device, wall)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - start
    return {"images_per_s": args.steps * bs / elapsed, "seconds": elapsed, "steps": args.steps,
            "compile": compile_options(args), "channels_last": cuda, "precision": "bf16 autocast" if cuda else "fp32",
            "loader": "fixed batch" if fixed_batch else "tensors on device"}


# -- b / c: through Lightning -----------------------------------------------------------------------
def compose_cfg(args, method: str):
    """train.py's config for this row, composed as ``@hydra.main`` would (run dir: a temp folder)."""
    options = compile_options(args)
    overrides = ["data=cifar10", "ood=none", "detectors=none", "logger=none", "callbacks=none",
                 f"method={method}", f"data.batch_size={args.batch_size}", "data.loader=gpu",
                 f"trainer={'cpu' if args.tiny else 'gpu'}",
                 "compile={" + ",".join(f"{k}:{v}" for k, v in options.items()) + "}" if isinstance(options, dict)
                 else f"compile={str(bool(options)).lower()}"]
    if args.tiny:
        overrides += ["backbone=cnn", "backbone.widths=[8,16]", "backbone.feature_dim=16"]
        if method == "dhm":
            overrides += ["method.flow.n_blocks=2", "method.flow.hidden=32"]
    else:
        overrides += ["backbone=wrn28_10"]
    out_dir = args.run_dir
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"hydra.run.dir={out_dir}"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = out_dir
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


class StepTimer(L.Callback):
    """Times batches ``warmup + profile .. end`` (synchronised); optionally profiles a few before."""

    def __init__(self, device, warmup: int, total: int, profile_steps: int = 0, profile_dir=None, name=""):
        self.device, self.warmup, self.total = device, warmup, total
        self.profile_steps, self.profile_dir, self.name = profile_steps, profile_dir, name
        self.start = self.end = self.prof_start = None
        self.prof = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.profile_steps and batch_idx == self.warmup:
            sync(self.device)
            self.prof = _profiler(self.device)
            self.prof.__enter__()
            self.prof_start = time.perf_counter()
        if batch_idx == self.warmup + self.profile_steps:
            if self.prof is not None:
                sync(self.device)
                wall = time.perf_counter() - self.prof_start
                self.prof.__exit__(None, None, None)
                _write_profile(self.prof, self.profile_dir, self.name, self.device, wall)
                self.prof = None
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.total - 1:
            sync(self.device)
            self.end = time.perf_counter()


def run_lightning(args, images, labels, method: str, profile_dir: Path | None) -> dict:
    cfg = compose_cfg(args, method)
    L.seed_everything(0, workers=True, verbose=False)
    dm = OODDataModule(cfg.data, cfg.ood)
    dm.train_set = ArrayData(images, labels)  # random CIFAR-shaped data; setup() keeps what is set
    dm.val_set = dm.test_set = ArrayData(images[: args.batch_size], labels[: args.batch_size])
    model = build_model(cfg, NUM_CLASSES)
    profile_steps = 3 if profile_dir is not None else 0
    total = args.warmup + profile_steps + args.steps
    timer = StepTimer(args.device, args.warmup, total, profile_steps, profile_dir, "b" if method == "classifier" else "c")
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[timer], enable_progress_bar=False,
                                     enable_checkpointing=False, enable_model_summary=False, max_epochs=1,
                                     limit_train_batches=total, limit_val_batches=0, num_sanity_val_steps=0)
    applied = apply_speedups(model, cfg, trainer.strategy.root_device)
    set_nan_check_every(model, cfg, trainer.strategy.root_device)
    trainer.fit(model, datamodule=dm)
    if timer.start is None or timer.end is None:
        raise RuntimeError(f"training stopped before the timed window ({trainer.global_step} steps)")
    elapsed = timer.end - timer.start
    return {"images_per_s": args.steps * args.batch_size / elapsed, "seconds": elapsed, "steps": args.steps,
            "compile": applied["compile"], "channels_last": applied["channels_last"],
            "precision": str(trainer.precision), "loader": type(trainer.train_dataloader).__name__}


def count_host_syncs(args, images, labels, method: str, steps: int = 4) -> float:
    """Host syncs per steady-state training step of this row (``ood_lightning/core/host_sync.py``).

    A short separate eager run (compile off: it inserts no host reads, and dispatch-mode
    interception would interfere with tracing), counted after 2 warm-up steps.
    """
    eager = argparse.Namespace(**{**vars(args), "compile": False})
    cfg = compose_cfg(eager, method)
    L.seed_everything(0, workers=True, verbose=False)
    dm = OODDataModule(cfg.data, cfg.ood)
    dm.train_set = ArrayData(images, labels)
    dm.val_set = dm.test_set = ArrayData(images[: args.batch_size], labels[: args.batch_size])
    model = build_model(cfg, NUM_CLASSES)
    counter = CountHostSyncs(skip=2)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[counter], enable_progress_bar=False,
                                     enable_checkpointing=False, enable_model_summary=False, max_epochs=1,
                                     limit_train_batches=2 + steps + 1, limit_val_batches=0, num_sanity_val_steps=0)
    apply_speedups(model, cfg, trainer.strategy.root_device)
    set_nan_check_every(model, cfg, trainer.strategy.root_device)
    trainer.fit(model, datamodule=dm)
    return counter.result.mean


# -- profiling -------------------------------------------------------------------------------------
def _profiler(device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def _write_profile(prof, folder: Path, name: str, device, wall_s: float | None = None) -> None:
    """Top ops of the profiled steps, and how busy the device was over their wall time."""
    folder.mkdir(parents=True, exist_ok=True)
    events = prof.key_averages()
    cuda = device.type == "cuda"
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    try:
        table = events.table(sort_by=key, row_limit=25)
    except (AttributeError, KeyError, ValueError):  # older torch names it self_cuda_time_total
        key = "self_cuda_time_total" if cuda else key
        table = events.table(sort_by=key, row_limit=25)
    busy_us = sum(getattr(e, key, 0.0) for e in events)
    summary = f"[profile {name}] 3 steps"
    if wall_s:
        what = "GPU kernels" if cuda else "torch ops (self CPU)"
        summary += f": wall {wall_s * 1e3:.1f} ms, {what} {busy_us / 1e3:.1f} ms = {100 * busy_us / 1e6 / wall_s:.0f}% busy"
    (folder / f"{name}_profile.txt").write_text(summary + "\n\n" + table)
    print(f"\n{summary}; top ops by {key}:\n" + "\n".join(table.splitlines()[:16]))


# -- report ----------------------------------------------------------------------------------------
LABELS = {"a0": "a0 plain PyTorch, fixed batch", "a": "a  plain PyTorch, data on device",
          "b": "b  Lightning method=classifier", "c": "c  Lightning method=dhm"}


def measure(args) -> dict:
    device = args.device
    gen = torch.Generator().manual_seed(0)
    shape = (3, 16, 16) if args.tiny else (3, 32, 32)
    images = torch.randint(0, 256, (args.images, *shape), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (args.images,), generator=gen)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results: dict[str, dict] = {}
    for row in args.rows:
        torch._dynamo.reset()  # drop the previous row's compiled graphs (and the model they hold)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            if row in ("a0", "a"):
                res = run_plain(args, images.to(device), labels.to(device), row == "a0", args.profile)
            else:
                res = run_lightning(args, images, labels, "classifier" if row == "b" else "dhm", args.profile)
        except Exception as err:  # one failing row (e.g. compile) must not hide the others
            traceback.print_exc()
            res = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            if args.compile and row in ("b", "c"):  # how far eager gets, so the table still has a figure
                print(f"row {row} failed with compile; measuring it eagerly", file=sys.stderr)
                eager = argparse.Namespace(**{**vars(args), "compile": False})
                try:
                    res = {**run_lightning(eager, images, labels, "classifier" if row == "b" else "dhm", None),
                           "note": f"compile failed ({res['error']}); eager"}
                except Exception as err2:
                    res["eager_error"] = f"{type(err2).__name__}: {err2}"
        if device.type == "cuda":
            res["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if row in ("b", "c"):
            try:
                res["host_syncs_per_step"] = count_host_syncs(args, images, labels,
                                                              "classifier" if row == "b" else "dhm")
            except Exception as err:  # a diagnostic: never costs the row its timing
                res["host_syncs_error"] = f"{type(err).__name__}: {err}"
        results[row] = res
        print(f"{LABELS[row]}: {res.get('images_per_s', float('nan')):.1f} images/s", flush=True)
    return results


def report(args, results: dict) -> str:
    dev = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    model = "tiny CNN (widths 8,16; 3x16x16 inputs; 2-block flow, hidden 32)" if args.tiny else \
        "WRN-28-10 (3x32x32; DHM: SN c=3 + 10-block residual flow, hidden 640)"
    lines = [f"device: {dev}; torch {torch.__version__}, lightning {L.__version__}",
             f"model: {model}; batch {args.batch_size}; {args.warmup} warm-up + {args.steps} timed steps",
             "", "| row | images/s | ×a | 200-epoch projection | peak GPU GiB | host syncs/step | precision | channels_last "
             "| compile | loader |",
             "|---|---:|---:|---:|---:|---:|---|---|---|---|"]
    base = results.get("a", {}).get("images_per_s")
    for row, res in results.items():
        rate = res.get("images_per_s")
        if rate is None:
            lines.append(f"| {LABELS[row]} | failed: {res.get('error')} | | | | | | | | |")
            continue
        ratio = f"{rate / base:.2f}" if base else "-"
        hours = args.epochs * args.dataset_size / rate / 3600
        proj = f"{hours * 60:.1f} min" if hours < 2 else f"{hours:.1f} h"
        mem = f"{res['peak_memory_gib']:.1f}" if "peak_memory_gib" in res else "-"
        note = f" ({res['note']})" if "note" in res else ""
        syncs = f"{res['host_syncs_per_step']:.2f}" if "host_syncs_per_step" in res else "-"
        lines.append(f"| {LABELS[row]}{note} | {rate:,.0f} | {ratio} | {proj} | {mem} | {syncs} | {res.get('precision')} | "
                     f"{res.get('channels_last')} | {res.get('compile')} | {res.get('loader')} |")
    if base:
        for row, target in (("b", 0.9), ("c", 0.75)):
            rate = results.get(row, {}).get("images_per_s")
            if rate:
                verdict = "" if args.tiny else (" (meets the target)" if rate / base >= target else " (MISSES the target)")
                lines.append(f"\n{row}/a = {rate / base:.3f}; target ≥ {target}{verdict}")
    lines.append("host syncs/step: reads of device values on the host per steady-state training step of b and c "
                 "(ood_lightning/core/host_sync.py; an eager run; the non-finite check reads the loss every "
                 "nan_check_every steps: 50 on CUDA, 1 on the CPU)")
    lines.append(f"\nprojection: {args.epochs} epochs × {args.dataset_size} images at the measured rate, training "
                 "steps only (no validation, no OOD evaluation)")
    if args.tiny:
        lines.append("CPU run with a tiny model: exercises the code path only; these figures are not the GPU targets")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):  # the table, not Lightning's banners
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.tiny:  # small CPU ops on a shared machine: more threads mostly wait on each other
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ood-bench-") as run_dir:  # the runs' Hydra output dir (stays empty)
        args.run_dir = run_dir
        results = measure(args)
    text = report(args, results)
    print("\n" + text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "table": text,
                   "device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return results


if __name__ == "__main__":
    out = main()
    sys.exit(0 if all("images_per_s" in r for r in out.values()) else 1)
