"""One GPU session of at most 10 minutes, ready for the day a GPU is lent (driven by gpu_session.sh).

    bash benchmarks/gpu_session.sh prepare                 # here: copies wheels + data into .device/
    bash benchmarks/gpu_session.sh run --out "$OUT"        # there (the device tool carries .device)
    python benchmarks/gpu_session.py run --dry-run --out /tmp/g   # on a CPU: the plan, the report, no training

In order, each step with its own time limit out of ``--budget-s`` (default 570 s, so the whole
session, wheel install included, stays under 10 minutes):

  throughput   ``benchmarks/throughput.py``: WRN-28-10 rows a (plain compiled bf16 loop), b (framework
               classifier) and c (DHM), images/s and b/a, c/a
  dhm_epoch    ``train.py experiment=dhm_cifar10 trainer.max_epochs=1``: one DHM epoch on CIFAR-10 and its
               time (the epoch's progress line: training steps plus the validation)
  classifier   ``train.py experiment=classifier_cifar10 backbone=resnet18``, as many epochs as fit
               (``trainer.max_time``), then ``method=lde`` on its checkpoint; MSP / LDE rows from ``metrics.json``
  cuda_tests   the tests that skip without CUDA (``CUDA_TESTS``)

Writes ``gpu_session.json`` and ``gpu_session.md`` (one table) and ``gpu_session.log`` (every step's
output) into ``--out``. A step that fails or runs out of time is reported as such; the next one runs.
The data are the JPEG CIFAR-10 packs (the lossless training pack alone is over the device tool's 64 MiB),
and the only OOD set is the synthetic noise: these are speed figures and a smoke test of the GPU path,
not results to compare with a paper.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the tests that skip on a machine without CUDA
CUDA_TESTS = ["tests/test_device_loader.py::test_auto_loader_is_on_the_gpu_with_a_cuda_trainer",
              "tests/test_device_loader.py::test_compile_true_on_gpu_runs_end_to_end"]
#: share of the budget per step (what is left by one step goes to the next)
SHARES = {"throughput": 0.30, "dhm_epoch": 0.25, "classifier": 0.33, "cuda_tests": 0.12}
#: seconds of the classifier step kept back for its process start, data loading, evaluation and the LDE run
CLASSIFIER_EVAL_S = 120


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["run"], help="run the session (gpu_session.sh prepare copies the inputs)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_session_out")),
                   help="where gpu_session.json / .md / .log go (default $OUT)")
    p.add_argument("--budget-s", type=float, default=570.0, help="seconds for all steps together")
    p.add_argument("--steps", default=",".join(SHARES), help=f"comma-separated subset of {','.join(SHARES)}")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: print each step's command, run none, write the report (a CPU check of the script)")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in args.steps if s not in SHARES]
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {','.join(SHARES)}")
    if args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    return args


def commands(args, step: str, limit_s: float, work: Path) -> list[list[str]]:
    """The command(s) of a step, given the seconds it may take."""
    py = args.python
    if step == "throughput":
        return [[py, "benchmarks/throughput.py", "--rows", "a,b,c", "--json", str(work / "throughput.json")]]
    if step == "dhm_epoch":
        return [[py, "train.py", "experiment=dhm_cifar10", "trainer.max_epochs=1", "ood=[noise]", "detectors=none",
                 "logger=csv", "evaluation.fit_limit=5000", f"hydra.run.dir={work / 'dhm_epoch'}"]]
    if step == "classifier":
        train_s = max(int(limit_s - CLASSIFIER_EVAL_S), 30)
        run = work / "classifier"
        return [[py, "train.py", "experiment=classifier_cifar10", "backbone=resnet18", "trainer.max_epochs=200",
                 f"+trainer.max_time={{seconds:{train_s}}}", "ood=[noise]", "detectors=fast", "logger=csv",
                 f"hydra.run.dir={run}"],
                [py, "train.py", "method=lde", "data=cifar10", "backbone=resnet18", "ood=[noise]", "detectors=[msp]",
                 "logger=csv", "trainer=gpu", f"backbone.checkpoint={run / 'checkpoints' / 'last.ckpt'}",
                 f"hydra.run.dir={work / 'lde'}"]]
    return [[py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *CUDA_TESTS]]


def run_step(args, step: str, limit_s: float, work: Path, log) -> dict:
    """Run a step's commands within ``limit_s``; its figures (or why there are none)."""
    result: dict = {"step": step, "limit_s": round(limit_s, 1)}
    start = time.perf_counter()
    for cmd in commands(args, step, limit_s, work):
        line = shlex.join(cmd)
        log.write(f"\n===== {step}: {line}\n")
        log.flush()
        result["command"] = f"{result['command']} ; {line}" if "command" in result else line
        if args.dry_run:
            result["status"] = "dry run (not run)"
            continue
        left = limit_s - (time.perf_counter() - start)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=max(left, 1))
            result["returncode"] = proc.returncode
            result["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            result["status"] = f"stopped at its {limit_s:.0f} s limit"
        if result["status"] != "ok":
            break
    result["wall_s"] = round(time.perf_counter() - start, 1)
    log.flush()
    if not args.dry_run:
        result.update(figures(step, work, Path(log.name)))
    return result


def figures(step: str, work: Path, log_path: Path) -> dict:
    """What each step measured, read from its outputs."""
    if step == "throughput":
        path = work / "throughput.json"
        if not path.exists():
            return {}
        rows = json.loads(path.read_text())["results"]
        out = {f"{r}_images_per_s": rows[r].get("images_per_s") for r in ("a", "b", "c") if r in rows}
        if out.get("a_images_per_s"):
            for r in ("b", "c"):
                if out.get(f"{r}_images_per_s"):
                    out[f"{r}_over_a"] = round(out[f"{r}_images_per_s"] / out["a_images_per_s"], 3)
        return out
    if step == "dhm_epoch":
        return {k: v for k, v in epoch_line(log_path.read_text(errors="replace"), "dhm_epoch").items()}
    if step == "classifier":
        out = epoch_line(log_path.read_text(errors="replace"), "classifier")
        out["metrics"] = {}
        for run in ("classifier", "lde"):
            metrics = work / run / "metrics.json"
            if metrics.exists():
                m = json.loads(metrics.read_text())
                out.setdefault("epochs", m.get("epochs"))
                out["metrics"].update({f"{run}: {k}": v for k, v in m.items()
                                       if isinstance(v, dict) and k not in ("timings_s", "fit_cache", "artifacts")})
        return out
    return {}


EPOCH_LINE = re.compile(r"epoch (\d+)(?:/\d+)?: ([\d,]+) steps in ([\d.]+ (?:s|min|h))")


def epoch_line(text: str, step: str) -> dict:
    """The last epoch progress line of ``step``'s section of the log ("epoch 1/1: 176 steps in 41 s")."""
    if f"===== {step}:" not in text:
        return {}
    section = text.split(f"===== {step}:")[-1].split("\n===== ")[0]
    found = EPOCH_LINE.findall(section)
    if not found:
        return {}
    epoch, steps, took = found[-1]
    value, unit = took.split()
    seconds = float(value) * {"s": 1, "min": 60, "h": 3600}[unit]
    return {"last_epoch": int(epoch), "epoch_steps": int(steps.replace(",", "")), "epoch_s": seconds}


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "", "| step | status | wall s | figures |", "|---|---|---:|---|"]
    for r in results:
        figs = {k: v for k, v in r.items() if k not in ("step", "status", "wall_s", "command", "limit_s", "returncode",
                                                       "metrics")}
        text = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in figs.items()) or "-"
        lines.append(f"| {r['step']} | {r.get('status', '-')} | {r.get('wall_s', '-')} | {text} |")
    for r in results:
        for name, block in (r.get("metrics") or {}).items():
            lines.append(f"\n{r['step']} `{name}`: " + ", ".join(f"{k} {v}" for k, v in block.items()))
    return "\n".join(lines)


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    except Exception as err:  # the report is still written
        return f"unknown ({type(err).__name__})"


def main(argv=None) -> list[dict]:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = ROOT / ".device" / "work"
    work.mkdir(parents=True, exist_ok=True)
    session_start = time.perf_counter()
    results = []
    with (args.out / "gpu_session.log").open("w") as log:
        used = 0.0  # a dry run counts each step at its whole limit: the plan's worst case
        for i, step in enumerate(args.steps):
            left = args.budget_s - used
            share = sum(SHARES[s] for s in args.steps[i:])
            limit = left * SHARES[step] / share  # time a step leaves goes to the ones after it
            if limit < 10:
                results.append({"step": step, "status": "skipped: the budget is spent"})
                continue
            results.append(run_step(args, step, limit, work, log))
            used = used + limit if args.dry_run else time.perf_counter() - session_start
            print(f"{step}: {results[-1].get('status')} ({results[-1].get('wall_s')} s)", flush=True)
    header = (f"GPU session {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {device_name()}; "
              f"budget {args.budget_s:.0f} s, used {time.perf_counter() - session_start:.0f} s"
              f"{' (dry run: nothing ran)' if args.dry_run else ''}")
    (args.out / "gpu_session.json").write_text(json.dumps({"header": header, "steps": results}, indent=1))
    (args.out / "gpu_session.md").write_text(markdown(results, header) + "\n")
    print(markdown(results, header))
    return results


if __name__ == "__main__":
    main()
