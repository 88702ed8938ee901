"""The cost projection line: its numbers from a fake clock, the CPU advice past the threshold."""

from __future__ import annotations

import logging

import pytest

from ood_lightning.core.cost import CPU_ADVICE, CostProjection, human
from tests.conftest import TINY, compose_cfg


class _Trainer:
    def __init__(self, batches: int, epochs: int, device: str = "cpu") -> None:
        self.num_training_batches, self.max_epochs, self.current_epoch, self.sanity_checking = batches, epochs, 0, False

        class _Strategy:
            class root_device:  # noqa: N801
                type = device

        self.strategy = _Strategy


class _Clock:
    """Advances by ``step`` seconds per training step (the test moves it)."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        return self.now


def _run(cb: CostProjection, trainer, steps: int) -> None:
    for i in range(steps):
        cb.on_train_batch_start(trainer, None, None, i)
        cb.clock.now += cb.clock.step  # this step's duration
        cb.on_train_batch_end(trainer, None, None, None, i)


@pytest.mark.parametrize(("seconds", "text"), [(42, "42 s"), (450, "7.5 min"), (9360, "2.6 h")])
def test_human_durations(seconds, text):
    assert human(seconds) == text


def test_line_from_a_fake_clock_adds_up_and_advises_on_cpu(caplog):
    cb = CostProjection(steps=5, threshold_min=30, clock=_Clock(39.0))
    caplog.set_level(logging.INFO)
    _run(cb, _Trainer(batches=242, epochs=3), 10)
    # 39 s/step x 242 steps = 9438 s = 2.6 h/epoch; x 3 epochs = 28314 s = 7.9 h
    assert cb.line.startswith("projected: 39.00 s/step x 242 steps/epoch = 2.6 h/epoch, 7.9 h for 3 epochs on cpu "
                              "(5 steps)")
    assert CPU_ADVICE in cb.line and "debug=fast" in cb.line and cb.line in caplog.text
    # a 39 s first step gives a first line at once, from that step (the user's DHM command on 2 cores)
    assert cb.early.startswith("projected: 39.00 s/step") and "from the first step" in cb.early


def test_a_slow_first_forward_pass_gives_an_estimate_before_the_backward(caplog):
    cb = CostProjection(steps=5, threshold_min=30, early_after_s=10.0, clock=_Clock(0.0))
    caplog.set_level(logging.INFO)
    trainer = _Trainer(batches=242, epochs=3)
    cb.on_train_batch_start(trainer, None, None, 0)
    cb.clock.now += 13.0  # the first forward pass of a WRN-28-10 on 2 cores
    cb.on_before_backward(trainer, None, None)
    # 3 x 13 s = 39 s/step, as the measured lines would compute it
    assert cb.from_forward.startswith("projected: 39.00 s/step x 242 steps/epoch = 2.6 h/epoch, 7.9 h for 3 epochs")
    assert "3 x the first forward pass" in cb.from_forward and "debug=fast" in cb.from_forward
    assert cb.line is None and cb.early is None  # the measured lines come later
    cb.clock.now += 1.0
    cb.on_before_backward(trainer, None, None)  # a second backward (manual optimisation): no second estimate
    assert caplog.text.count("3 x the first forward pass") == 1
    fast = CostProjection(steps=5, early_after_s=10.0, clock=_Clock(0.0))
    fast.on_train_batch_start(trainer, None, None, 0)
    fast.clock.now += 3.0  # 3 x 3 s < 10 s: not worth an estimate
    fast.on_before_backward(trainer, None, None)
    assert fast.from_forward is None


def test_short_runs_and_gpus_get_no_advice():
    cb = CostProjection(steps=3, threshold_min=30, clock=_Clock(1.0))
    _run(cb, _Trainer(batches=10, epochs=1), 5)
    assert cb.line == "projected: 1.00 s/step x 10 steps/epoch = 10 s/epoch, 10 s for 1 epochs on cpu (3 steps)"
    assert cb.early is None  # a 1 s first step: no early line
    gpu = CostProjection(steps=3, clock=_Clock(100.0))
    _run(gpu, _Trainer(batches=1000, epochs=200, device="cuda"), 5)
    assert gpu.line.endswith("on cuda (3 steps)") and CPU_ADVICE not in gpu.line


def test_the_first_validation_corrects_the_projection_with_every_step_and_its_own_time(caplog):
    """The DHM case: the first steps looked cheap, later ones were not, and the validation (exact
    log-dets, the OOD monitor) was never counted; the second line is the measured whole."""
    cb = CostProjection(steps=5, threshold_min=1000, clock=_Clock(0.34))
    caplog.set_level(logging.INFO)
    trainer = _Trainer(batches=30, epochs=2)
    trainer.check_val_every_n_epoch = 1
    trainer.sanity_checking = True  # Lightning's sanity check (before training) is not the validation
    cb.on_validation_start(trainer, None)
    cb.clock.now += 99.0
    cb.on_validation_end(trainer, None)
    trainer.sanity_checking = False
    _run(cb, trainer, 6)  # step 0 warms up, steps 1-5 at 0.34 s
    assert cb.line.startswith("projected: 0.34 s/step x 30 steps/epoch = 10 s/epoch")
    cb.clock.step = 1.0
    _run(cb, trainer, 24)  # the rest of the epoch: 1.0 s/step
    assert cb.with_validation is None
    cb.on_validation_start(trainer, None)
    cb.clock.now += 19.0
    cb.on_validation_end(trainer, None)
    # steps 1..29: 5 x 0.34 + 24 x 1.0 = 25.7 s / 29 steps = 0.886 s/step; 30 x 0.886 + 19 = 45.6 s/epoch
    assert cb.with_validation.startswith("projected: 0.89 s/step x 30 steps/epoch + 19 s validation = 46 s/epoch, "
                                         "91 s for 2 epochs on cpu (29 steps, plus 19 s of validation every 1 epoch(s))")
    assert cb.with_validation in caplog.text
    cb.on_validation_start(trainer, None)  # later validations: no third line
    cb.clock.now += 5.0
    cb.on_validation_end(trainer, None)
    assert caplog.text.count("of validation every") == 1


def test_no_line_for_an_epoch_shorter_than_the_measurement():
    cb = CostProjection(steps=5, clock=_Clock(1.0))
    _run(cb, _Trainer(batches=4, epochs=1), 4)  # debug=fast: 4 batches
    assert cb.line is None


def test_a_real_tiny_run_logs_the_projection(tmp_path, caplog):
    from ood_lightning.run.runs import train

    caplog.set_level(logging.INFO)
    overrides = [o for o in TINY if o != "debug=fast"]
    train(compose_cfg("train", [*overrides, "trainer.max_epochs=1", "detectors=none",
                                "callbacks.cost_projection.threshold_min=0", "data.n_train=600", "data.batch_size=16"], tmp_path))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("projected:"))
    assert "steps/epoch" in line and "for 1 epochs on cpu" in line and "debug=fast" in line
