"""Stage progress (ood_lightning.core.progress): off a terminal, lines at the interval with the count,
rate and ETA worked out by hand from a fake clock; on a terminal, a rich bar and no lines; and the
long stages (a split's pass, a scorer's own pass, a latent flow's fit, a training epoch) report
through it."""

from __future__ import annotations

import io
import logging
import sys
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from torch import nn

from ood_lightning.core.progress import EpochProgress, Progress, stage
from ood_lightning.scoring.passes import extract


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def pipe() -> Console:
    """A console writing to a file: what ``python train.py | cat`` gives rich."""
    return Console(file=io.StringIO(), force_terminal=False)


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=120)


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ood_lightning.core.progress"]


def test_off_a_terminal_a_line_every_interval_with_count_rate_and_eta(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="ood_lightning.core.progress"), \
            Progress(console=pipe(), every=30, clock=clock) as progress:
        with progress.stage("features: id_test", total=1000) as st:
            clock.t = 10.0
            st.advance(100)  # 10 s in: no line yet
            clock.t = 29.9
            st.advance(50)
            assert messages(caplog) == []
            clock.t = 31.0
            st.advance(50)  # 200 done in 31 s: 6.45/s, 800 left -> 124 s = 2.1 min
            clock.t = 40.0
            st.advance(100)  # 9 s after the last line: none
            clock.t = 62.0
            st.advance(100)  # 400 in 62 s: 6.45/s, 600 left -> 93 s
            clock.t = 100.0
            st.advance(600)  # done: the closing line only
    assert messages(caplog) == [
        "features: id_test: 200/1,000 inputs (6.5/s, ETA 2.1 min)",
        "features: id_test: 400/1,000 inputs (6.5/s, ETA 93 s)",
        "features: id_test: 1,000 inputs in 100 s (10/s)",
    ]


def test_fields_are_shown_and_an_error_gets_no_closing_line(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="ood_lightning.core.progress"), \
            Progress(console=pipe(), every=30, clock=clock) as progress:
        with pytest.raises(RuntimeError), progress.stage("fitting flow", 10, "steps") as st:
            clock.t = 30.0
            st.advance(1, bpd=3.25)
            raise RuntimeError("boom")
    assert messages(caplog) == ["fitting flow: 1/10 steps (0.033/s, ETA 4.5 min) bpd 3.25"]


def test_on_a_terminal_a_rich_bar_and_no_progress_lines(caplog):
    clock = FakeClock()
    console = terminal()
    stdout = sys.stdout
    handler = logging.StreamHandler(stdout)  # what Hydra's console log handler is
    logging.getLogger().addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="ood_lightning.core.progress"), \
                Progress(console=console, every=30, clock=clock) as progress:
            assert progress.terminal and progress.bars is not None
            assert handler.stream is not stdout  # log lines go through rich, above the bars
            _draw_one_stage(progress, clock)
    finally:
        logging.getLogger().removeHandler(handler)
    assert handler.stream is stdout
    drawn = console.file.getvalue()
    assert "features: svhn" in drawn and "━" in drawn and "400/400" in drawn
    assert "features: svhn: 400 inputs in 2.0 min (3.3/s)" in drawn  # the closing line, through rich
    assert messages(caplog) == ["features: svhn: 400 inputs in 2.0 min (3.3/s)"]  # the closing line only
    assert not Progress(console=terminal(), bars=False).terminal  # other ranks: lines, no bar


def _draw_one_stage(progress: Progress, clock: FakeClock) -> None:
    with progress.stage("features: svhn", total=400) as st:
        for _ in range(4):
            clock.t += 30.0  # an interval each: lines, were this not a terminal
            st.advance(100)
        progress.bars.refresh()  # draw now (rich refreshes on its own thread)
        (task,) = progress.bars.tasks
        assert (task.completed, task.total, task.description) == (100 * 4, 400, "features: svhn")


def test_a_stage_joins_the_enclosing_display_or_makes_its_own(caplog):
    with Progress(console=terminal()) as outer:
        st = stage("inner", 5)
        assert st.progress is outer and not st.owns
        st.finish()
    own = stage("alone", 5)
    assert own.owns and own.progress is not outer
    own.finish()


class _Linear(nn.Module):
    """A FeatureModel: penultimate = the inputs, logits = a fixed linear map."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward_features(self, x):
        return {"penultimate": x}

    def classify(self, h):
        return self.fc(h)


def test_a_split_pass_reports_through_the_clock_of_the_enclosing_display(caplog):
    clock = FakeClock()
    data = torch.utils.data.TensorDataset(torch.randn(100, 3), torch.zeros(100, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=10)

    def preprocess(x):
        clock.t += 10.0  # every batch takes 10 s
        return x

    with caplog.at_level(logging.INFO, logger="ood_lightning.core.progress"), \
            Progress(console=pipe(), every=30, clock=clock) as progress:
        out = extract(_Linear(), loader, preprocess, "cpu", progress, "features: id_test")
    assert len(out) == 100
    assert messages(caplog) == [
        "features: id_test: 30/100 inputs (1/s, ETA 70 s)",
        "features: id_test: 60/100 inputs (1/s, ETA 40 s)",
        "features: id_test: 90/100 inputs (1/s, ETA 10 s)",
        "features: id_test: 100 inputs in 100 s (1/s)",
    ]


def test_a_latent_flow_fit_reports_its_steps(caplog):
    from ood_lightning.methods.lde.latent_flow import LatentFlowDetector
    from ood_lightning.scoring.api import FitData, Outputs

    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    det = LatentFlowDetector(flow="maf", n_blocks=1, hidden=8, epochs=2, batch_size=16, device="cpu")
    with caplog.at_level(logging.INFO, logger="ood_lightning.core.progress"), \
            Progress(console=pipe(), every=0.0) as progress:  # every step gets a line
        det.fit(None, FitData(Outputs(logits=torch.zeros(64, 2), features=x)))
        assert progress.bars is None
    lines = messages(caplog)
    assert len(lines) == 8  # 2 epochs x 4 steps: 7 progress lines and the closing one
    assert lines[0].startswith("fitting maf flow: 1/8 steps (") and " epoch 1 bpd " in lines[0]
    assert lines[-1].startswith("fitting maf flow: 8 steps in ") and "; epoch 2 bpd " in lines[-1]


def test_training_epochs_get_lines_off_a_terminal_and_none_on_one(caplog):
    clock = FakeClock()
    trainer = SimpleNamespace(is_global_zero=True, num_training_batches=10, current_epoch=0, max_epochs=3)
    with caplog.at_level(logging.INFO, logger="ood_lightning.core.progress"):
        for console in (terminal(), pipe()):
            cb = EpochProgress(every=30, console=console, clock=clock)
            cb.on_train_epoch_start(trainer, None)
            for i in range(10):
                clock.t += 5.0
                cb.on_train_batch_end(trainer, None, {"loss": torch.tensor(2.0 - 0.1 * i)}, None, i)
            cb.on_train_epoch_end(trainer, None)
    assert messages(caplog) == [  # the terminal's 50 s moved the clock, and logged nothing
        "epoch 1/3: 6/10 steps (0.2/s, ETA 20 s) loss 1.5",
        "epoch 1/3: 10 steps in 50 s (0.2/s); loss 1.1",
    ]


def test_a_stage_faster_than_quiet_under_gets_no_closing_line(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="ood_lightning.core.progress"), \
            Progress(console=pipe(), clock=clock) as progress:
        for seconds in (0.5, 1.0):
            with progress.stage(f"scoring {seconds}", 10, quiet_under=1.0) as st:
                clock.t += seconds
                st.advance(10)
    assert messages(caplog) == ["scoring 1.0: 10 inputs in 1 s (10/s)"]


def test_the_evaluation_loop_closes_one_stage_per_pass_fit_and_score(tmp_path, caplog, monkeypatch):
    """score_all on an untrained tiny classifier: a closing line for every split's pass, the fits,
    each detector's scoring and the OOD-tuned detector's per-set fits, with the right counts."""
    from ood_lightning.scoring import loop

    monkeypatch.setattr(loop, "QUIET_UNDER_S", 0.0)  # these take milliseconds: show their lines anyway
    from ood_lightning.detectors.mahalanobis import MahalanobisTuned
    from ood_lightning.detectors.msp import MSP
    from ood_lightning.scoring.loop import score_all
    from tests.conftest import TINY, untrained_run

    _, dm, model = untrained_run([*TINY, "data.n_train=200", "data.val_size=40", "data.n_test=60",
                                  "ood.diagonal.n=50"], tmp_path)
    with caplog.at_level(logging.INFO, logger="ood_lightning.core.progress"):
        score_all(model, dm, {"msp": MSP(), "maha_tuned": MahalanobisTuned(layers="penultimate")}, "cpu", fit_limit=120)
    closing = sorted(m.split(" in ")[0] for m in messages(caplog))
    assert closing == sorted(["features: id_train: 120 inputs", "features: id_val: 40 inputs",
                              "features: id_test: 60 inputs", "features: diagonal: 50 inputs",
                              "fitting scorers: 1 scorers", "scoring msp: 150 inputs", "fit+score maha_tuned: 1 OOD sets"])
