"""Where a result came from: the command, the code's commit and the machine it ran on.

Recorded in every run's ``metrics.json`` (and by the study drivers), so a results page written
from it (``evaluate.py run_dir=<run> report=<page.md>``) states them without anyone typing them.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def command() -> str:
    """The command line of this process, as a user would type it (``python train.py k=v ...``)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        argv[0] = os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0]
    return "python " + shlex.join(argv)


def commit() -> dict:
    """The project's git commit and whether the working tree had uncommitted changes (None outside git)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU model, cores, torch threads, GPU (if any) and the 1-minute load average now."""
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_1min": load_average(), "torch": torch.__version__, "python": platform.python_version()}


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none, e.g. Windows)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def describe_machine(m: dict) -> str:
    """One line: ``Xeon ... (2 cores), 1 torch thread, load 3.2 -> 4.1``."""
    load = m.get("load_1min")
    end = m.get("load_1min_end")
    loads = f"load average {load}" + (f" at the start, {end} at the end" if end is not None else "")
    threads = m.get("torch_threads")
    return (f"{m.get('cpu')} ({m.get('cores')} cores{', ' + m['gpu'] if m.get('gpu') else ''}), "
            f"{threads} torch thread{'s' if threads != 1 else ''}, {loads}")
