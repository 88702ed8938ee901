"""Exact resume (issue 15 item 5): a run stopped after epoch 1 and resumed from its ``last.ckpt``
ends with the same metrics and scores, to the last bit, as the run that was never stopped.

The stopped run is the same 2-epoch run (same config, so the same LR schedule) that stops after
its first epoch, as a run killed there would: its ``last.ckpt`` is what SIGKILL leaves behind.
"""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest

from ood_lightning.assembly.runs import train
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
}
_STOP = f"+callbacks.stop_after={{_target_: {__name__}.StopAfterEpoch, epochs: 1}}"


def _results(run_dir) -> tuple[dict, dict]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("timings_s")  # wall-clock seconds, the one thing a rerun may not repeat
    with np.load(run_dir / "scores.npz") as scores:
        return metrics, {k: scores[k] for k in scores.files}


@pytest.mark.parametrize("method", list(METHODS))
def test_resumed_run_equals_uninterrupted_run_bitwise(method, tmp_path):
    overrides = [*TINY, *_SMALL, *METHODS[method]]
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
