"""SIGTERM: the run saves a resumable checkpoint, writes ``failed.json`` with
``"reason": "terminated"`` and the exact resume command, and exits non-zero; resuming from that
checkpoint mid-epoch ends bitwise where the run that was never stopped ends."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import lightning as L
import numpy as np
import pytest

from ood_lightning.run.cli import run_safely
from ood_lightning.run.runs import train
from tests.conftest import ROOT, TINY, compose_cfg
from tests.test_resume import overrides_for


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after training batch ``batch`` of epoch ``epoch``, as a scheduler would."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermInSetup(L.Callback):
    """SIGTERM while ``fit`` sets up, before Lightning has installed its own handler."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_before_lightnings_handler_is_not_lost(tmp_path):
    stop = f"+callbacks.sigterm={{_target_: {__name__}.SigtermInSetup}}"
    cfg = compose_cfg("train", [*TINY, "detectors=none", "logger=none", "callbacks.progress_bar=null", stop], tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_safely(train, cfg)
    assert exit_.value.code == 143
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert failed["reason"] == "terminated" and failed["checkpoint"] == str(tmp_path / "checkpoints" / "terminated.ckpt")
    assert not (tmp_path / "metrics.json").exists()


def _results(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("timings_s")
    metrics.pop("provenance")  # the command, commit, machine and wall time of each process
    with np.load(run_dir / "scores.npz") as scores:
        return metrics, {k: scores[k] for k in scores.files}


@pytest.mark.parametrize("method", ["classifier", pytest.param("dhm", marks=pytest.mark.slow), "vmdls"])
def test_sigterm_mid_epoch_resumes_bitwise(method, tmp_path):
    overrides = overrides_for(method)
    train(compose_cfg("train", overrides, tmp_path / "straight"))

    stop = f"+callbacks.sigterm={{_target_: {__name__}.SigtermAt, epoch: 1, batch: 0}}"
    cfg = compose_cfg("train", [*overrides, stop], tmp_path / "killed")
    with pytest.raises(SystemExit) as exit_:
        run_safely(train, cfg)
    assert exit_.value.code == 143
    failed = json.loads((tmp_path / "killed" / "failed.json").read_text())
    ckpt = tmp_path / "killed" / "checkpoints" / "terminated.ckpt"
    assert failed["reason"] == "terminated" and failed["checkpoint"] == str(ckpt) and ckpt.is_file()
    command = shlex.split(failed["resume_command"])
    assert command[:2] == ["python", "train.py"] and f"ckpt_path={ckpt}" in command
    assert [o for o in command if o in overrides] == overrides  # the run's own overrides, in order
    assert not (tmp_path / "killed" / "metrics.json").exists()

    train(compose_cfg("train", [*overrides, f"ckpt_path={ckpt}"], tmp_path / "resumed"))
    (straight, straight_scores), (resumed, resumed_scores) = _results(tmp_path / "straight"), _results(tmp_path / "resumed")
    assert resumed == straight
    for key, value in straight_scores.items():
        np.testing.assert_array_equal(resumed_scores[key], value, err_msg=key)


@pytest.mark.slow
def test_sigterm_to_a_running_train_py_leaves_a_resume_command_that_resumes(tmp_path):
    """A fresh ``train.py`` process, SIGTERM once its first epoch's checkpoint is written."""
    run = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=30", "detectors=none", "callbacks.progress_bar=null", "logger=none",
            f"paths.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.ckpt").exists():  # training has started: epoch 0 is done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "error: terminated by SIGTERM" in err, err[-3000:]
    failed = json.loads((run / "failed.json").read_text())
    assert failed["reason"] == "terminated"
    assert failed["checkpoint"] == str(run / "checkpoints" / "terminated.ckpt")
    assert not (run / "metrics.json").exists()

    command = shlex.split(failed["resume_command"])
    assert command[0] == "python" and command[1].endswith("train.py")
    res = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 30
    assert not (run / "failed.json").exists()  # moved aside with the attempt it described
