"""Exact resume: a run stopped after epoch 1 and resumed from its ``last.ckpt``
ends with the same metrics and scores, to the last bit, as the run that was never stopped.

The stopped run is the same 2-epoch run (same config, so the same LR schedule) that stops after
its first epoch, as a run killed there would: its ``last.ckpt`` is what SIGKILL leaves behind.
"""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest

from ood_lightning.run.runs import train
from tests.conftest import TINY, compose_cfg


class StopAfterEpoch(L.Callback):
    """Ends ``fit`` after ``epochs`` epochs (after that epoch's checkpoint), like a killed run."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


_SMALL = ["data.n_train=400", "data.val_size=80", "data.n_test=100", "ood.diagonal.n=100", "data.batch_size=32",
          "trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "detectors=fast",
          "callbacks.progress_bar=null", "logger=none"]
METHODS = {
    "classifier": [],
    # dequantisation noise and the residual flow's Russian-roulette / probe draws
    "dhm": ["method=dhm", "method.flow.n_blocks=2", "method.flow.hidden=16", "method.monitor_ood.limit=50"],
    # class-structured batches (ClassBatchSampler: seed + epoch) and the reparameterised z
    "vmdls": ["method=vmdls", "backbone.widths=[8,8,16]", "method.latent_dim=4", "method.samples_per_class=8",
              "method.classes_per_batch=2", "method.autoencoder.widths=[4,8]", "method.autoencoder.bottleneck=2"],
    # the reparameterised samples and the IWAE scores' posterior draws
    "vae": ["method=vae", "backbone=dcgan", "backbone.widths=[8,16]", "backbone.image_size=9", "method.latent_dim=4",
            "method.iwae_samples=[2]"],
}
_STOP = f"+callbacks.stop_after={{_target_: {__name__}.StopAfterEpoch, epochs: 1}}"


def _results(run_dir) -> tuple[dict, dict]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("timings_s")
    metrics.pop("provenance")  # the command, commit, machine and wall time of each process  # wall-clock seconds, the one thing a rerun may not repeat
    with np.load(run_dir / "scores.npz") as scores:
        return metrics, {k: scores[k] for k in scores.files}


def overrides_for(method: str) -> list[str]:
    own = METHODS[method]
    tiny = [o for o in TINY if not o.startswith("backbone")] if any(o.startswith("backbone=") for o in own) else TINY
    return [*tiny, *_SMALL, *own]


@pytest.mark.parametrize("method", [pytest.param(m, marks=[pytest.mark.slow] if m == "vae" else []) for m in METHODS])
def test_resumed_run_equals_uninterrupted_run_bitwise(method, tmp_path):
    overrides = overrides_for(method)
    train(compose_cfg("train", overrides, tmp_path / "straight"))
    train(compose_cfg("train", [*overrides, _STOP], tmp_path / "stopped"))
    stopped, _ = _results(tmp_path / "stopped")
    assert stopped["epochs"] == 1
    ckpt = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    train(compose_cfg("train", [*overrides, f"ckpt_path={ckpt}"], tmp_path / "resumed"))

    (straight, straight_scores), (resumed, resumed_scores) = _results(tmp_path / "straight"), _results(tmp_path / "resumed")
    assert resumed["epochs"] == straight["epochs"] == 2
    assert resumed == straight  # every metric, exactly
    assert resumed_scores.keys() == straight_scores.keys()
    for key, value in straight_scores.items():
        np.testing.assert_array_equal(resumed_scores[key], value, err_msg=key)
    # the stopped run really differs (one epoch fewer): the comparison above can fail
    assert stopped["results"] != straight["results"]


# -- the pieces: a training order that is a function of (seed, epoch), RNG states in a checkpoint
def test_cpu_batches_are_device_loader_order_and_resume_mid_epoch():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    from ood_lightning.data.device_loader import EpochBatchSampler, EpochPermutation

    n, b = 50, 8
    truth = {e: EpochPermutation(n, b, drop_last=True, seed=7).indices(e).split(b) for e in (0, 1, 2)}
    loader = DataLoader(range(n), batch_sampler=EpochBatchSampler(n, b, drop_last=True, seed=7))
    _set_sampler_epoch(loader, 2)  # what Lightning calls before epoch 2 (it reaches batch_sampler.sampler)
    assert [t.tolist() for t in loader] == [t.tolist() for t in truth[2]]
    resumed = EpochBatchSampler(n, b, drop_last=True, seed=7)
    resumed.resume_at(1, 2)  # a checkpoint taken after 2 batches of epoch 1
    _set_sampler_epoch(DataLoader(range(n), batch_sampler=resumed), 1)
    assert list(resumed) == [t.tolist() for t in truth[1][2:]]
    assert list(resumed) == [t.tolist() for t in truth[2]]  # the next epoch is whole again
    assert len(resumed) == len(truth[1]) == n // b


def test_class_batches_reach_lightnings_set_epoch_and_resume_mid_epoch():
    import torch
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    from ood_lightning.data.class_batch_sampler import ClassBatchSampler

    labels = torch.arange(60) % 3
    epochs = []
    for e in (0, 1):
        s = ClassBatchSampler(labels, 2, 4, seed=3)
        s.set_epoch(e)
        epochs.append(list(s))
    assert epochs[0] != epochs[1]
    fresh = ClassBatchSampler(labels, 2, 4, seed=3)
    _set_sampler_epoch(DataLoader(range(60), batch_sampler=fresh), 1)  # a run resumed at epoch 1
    assert list(fresh) == epochs[1]
    fresh.resume_at(1, 3)
    assert list(fresh) == epochs[1][3:]


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    import random

    import torch

    from ood_lightning.core import rng_state

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(rng_state.collect(), tmp_path / "rng.pt")
    first = torch.rand(4), np.random.rand(4), random.random()
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    rng_state.restore(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = torch.rand(4), np.random.rand(4), random.random()
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
