"""CPU start-up choices: intra-op threads, the OpenMP wait policy, and whether bf16 is fast here.

OpenMP reads ``OMP_WAIT_POLICY`` and ``OMP_NUM_THREADS`` once, when torch loads it, so
:func:`configure_threads` runs first thing in ``train.py`` / ``evaluate.py``, before torch is
imported; it imports nothing heavy. What it chose is logged in the run's first lines
(:func:`log_thread_choice`). Figures behind the defaults: docs/performance.md ("Threads"),
``benchmarks/cpu_threads.py``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

#: machines with at most this many cores are treated as shared small boxes: 1 intra-op thread
SMALL_MACHINE_CORES = 4
#: threads on a small machine: 2 threads on a shared 2-core box were 2-11x slower than 1
SMALL_MACHINE_THREADS = 1

_choice: str | None = None


def configure_threads(environ=os.environ, cores: int | None = None) -> str:
    """Set ``OMP_NUM_THREADS`` (and ``MKL_NUM_THREADS``) to 1 on a machine of at most
    ``SMALL_MACHINE_CORES`` cores unless the user set them; leave larger machines to torch's
    default. Where the user asked for several threads and no wait policy, ``OMP_WAIT_POLICY=PASSIVE``.
    Returns (and remembers, for :func:`log_thread_choice`) a one-line description."""
    global _choice
    cores = os.cpu_count() or 1 if cores is None else cores
    if "OMP_NUM_THREADS" in environ:
        threads, why = environ["OMP_NUM_THREADS"], "OMP_NUM_THREADS set by the user"
    elif cores <= SMALL_MACHINE_CORES:
        threads = str(SMALL_MACHINE_THREADS)
        environ["OMP_NUM_THREADS"] = threads
        environ.setdefault("MKL_NUM_THREADS", threads)
        why = (f"default on a machine of <= {SMALL_MACHINE_CORES} cores, which other jobs share "
               "(more threads were measured far slower under load; set OMP_NUM_THREADS to change it)")
    else:
        threads, why = "torch default", f"{cores} cores: torch's default (set OMP_NUM_THREADS to change it)"
    if "OMP_WAIT_POLICY" in environ:
        policy = f"{environ['OMP_WAIT_POLICY']} (set by the user)"
    elif threads not in ("1", "torch default"):
        # more than one thread on a shared box: the runtime's spinning default was 2-2.6x slower than
        # one thread under load, PASSIVE was not (docs/performance.md, "Threads")
        environ["OMP_WAIT_POLICY"] = policy = "PASSIVE"
    else:
        policy = "runtime default"
    _choice = f"CPU threads: {threads} intra-op ({why}); OMP_WAIT_POLICY={policy}; {cores} cores"
    return _choice


def log_thread_choice(log: logging.Logger) -> None:
    """The choice of :func:`configure_threads`, with the thread count torch actually uses."""
    import torch

    log.info("%s; torch uses %d", _choice or configure_threads(), torch.get_num_threads())


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux); empty where unknown."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_bf16(flags: set[str] | None = None) -> bool:
    """Whether bf16 autocast is measured to be faster than fp32 on this CPU: only with AMX
    (``amx_bf16``: 2-4x on Xeons). Without it oneDNN emulates bf16; on an AVX2-only EPYC a
    bf16 matmul ran at 1/60 of fp32's speed (docs/performance.md)."""
    return "amx_bf16" in (cpu_flags() if flags is None else flags)
