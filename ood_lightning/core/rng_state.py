"""Every random stream a run draws from, as plain tensors and numbers a checkpoint can hold.

A resumed run must draw what the uninterrupted run would have drawn: dequantisation noise,
augmentation, a VAE's samples, the residual flow's Russian-roulette and probe draws all come
from the global torch (and CUDA) generators, some code from numpy's or Python's. Lightning's
checkpoint holds none of them, so :class:`~ood_lightning.methods.base.OODMethod` stores
:func:`collect` and restores it with :func:`restore`. The values are tensors, lists and numbers
only, so the checkpoint still reads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def collect() -> dict:
    """The current state of the torch CPU, CUDA (every device), numpy and Python generators."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "state": list(py_state), "gauss": py_gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    """Set every generator :func:`collect` saved (CUDA only where the devices match in number)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
