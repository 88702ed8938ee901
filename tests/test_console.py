"""The console of a run: no third-party notice about other products or the accelerators, no torch
deprecation that Lightning triggers, no 'FLOPs 0' table, no progress bar's last frame in a file or a
pipe, no W&B footer; the one-line parameter summary, 1-based epoch lines and the scoring plan instead."""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from ood_lightning.core.console import quiet_known_noise
from ood_lightning.core.progress import Progress, TrainingBar
from ood_lightning.data import packs
from tests.conftest import TINY, run_script


def test_the_dropped_notices_are_exactly_the_known_ones(caplog):
    quiet_known_noise()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        log.info("GPU available: False, used: False")
        log.info("TPU available: False, using: 0 TPU cores")
        log.info("`Trainer.fit` stopped: `max_epochs=3` reached.")
        log.info("`Trainer.fit` stopped: No training batches.")  # a real notice stays
    assert [r.getMessage() for r in caplog.records] == ["`Trainer.fit` stopped: No training batches."]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_known_noise()  # filters added after simplefilter win
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("some other FutureWarning", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["some other FutureWarning"]


@pytest.mark.slow
def test_a_run_s_console_has_no_known_noise(tmp_path):
    # a pipe, as in a log file or CI; W&B offline (run_script sets WANDB_MODE=offline)
    res = run_script("train.py", *TINY, "detectors=fast", "logger=wandb", f"hydra.run.dir={tmp_path}", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout + res.stderr
    for noise in ("litlogger", "LeafSpec", "FLOPs", "GPU available", "TPU available", "Seed set", "Trainer.fit",
                  "Epoch 0", "Epoch 1", "it/s", "Run history", "Run summary", "wandb sync"):
        assert noise not in text, noise
    assert not re.search(r"━ +\d+/\d+", text)  # a progress bar's last frame ("━━━━ 4/4")
    assert "\n\n" not in text.replace("\r\n", "\n")  # no blank line anywhere
    assert "model Classifier: backbone SmallCNN" in text and "scoring 1 OOD sets with 3 scorers" in text
    # the thread choice is among the run's first lines, with the count torch really uses
    assert re.search(r"CPU threads: \S+ intra-op \(.*\); OMP_WAIT_POLICY=.*; torch uses \d+", text)
    assert text.index("CPU threads:") < text.index("model Classifier")
    assert "training on cpu" in text and "epoch 1/1: 4 steps" in text  # 1-based, as the config's max_epochs
    assert "offline-run-" in text  # W&B's opening lines still say where its files are
    # debug=fast: a smoke run, said right above the table and in metrics.json
    lines = text.splitlines()
    note = next(i for i, line in enumerate(lines) if line.startswith("SMOKE RUN (debug=fast)"))
    assert "not results" in lines[note] and "OOD detection" in lines[note + 1]
    assert json.loads((tmp_path / "metrics.json").read_text())["smoke"] is True


def test_the_training_bar_counts_epochs_from_one_and_stays_off_a_non_terminal() -> None:
    bar = TrainingBar()
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(0).strip() == "Epoch 1/3"
    assert bar._get_train_description(2).strip() == "Epoch 3/3"
    piped = TrainingBar(console=Console(file=io.StringIO()))  # a StringIO is no terminal
    piped.setup(SimpleNamespace(is_global_zero=True), None, "fit")
    assert not piped.is_enabled
    tty = TrainingBar(console=Console(file=io.StringIO(), force_terminal=True))
    tty.setup(SimpleNamespace(is_global_zero=True), None, "fit")
    assert tty.is_enabled


def test_decoding_a_pack_writes_no_blank_line_and_logs_its_closing_line(capsys, caplog) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(buf, format="JPEG")
    n, blob = 6000, buf.getvalue()  # above the 5000 from which rich's track drew (and left a blank line)
    jpeg, offsets = np.frombuffer(blob * n, np.uint8), np.arange(n + 1, dtype=np.int64) * len(blob)
    ticks = iter(range(0, 10**6, 1))  # one second per clock read: the stage lasts long enough to report
    with caplog.at_level(logging.INFO, logger="ood_lightning.progress"), \
            Progress(console=Console(file=io.StringIO()), every=1e9, clock=lambda: float(next(ticks))):
        images = packs._decode(jpeg, offsets)
    assert images.shape == (n, 3, 4, 4)
    assert capsys.readouterr().out == ""
    assert "decoding pack: 6,000 images in" in caplog.text


def test_wandb_logger_does_not_pass_the_anonymous_setting_that_wandb_warns_about(monkeypatch):
    """Lightning's WandbLogger hands wandb.init ``anonymous=None`` always; wandb warns "The
    anonymous setting has no effect" for any value but unset. Ours leaves it out unless asked."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from ood_lightning.run.loggers import QuietWandbLogger

    warned = []
    monkeypatch.setattr(wandb, "termwarn", lambda msg, *a, **k: warned.append(msg))
    wandb.Settings(**{k: v for k, v in WandbLogger(offline=True)._wandb_init.items() if k == "anonymous"})
    assert any("anonymous setting has no effect" in m for m in warned)  # the cause, in Lightning's logger
    warned.clear()
    init = QuietWandbLogger(offline=True, project="p", name="n")._wandb_init
    assert "anonymous" not in init and init["project"] == "p" and init["name"] == "n"
    wandb.Settings(**{k: v for k, v in init.items() if k == "anonymous"})
    assert warned == []
    assert QuietWandbLogger(offline=True, anonymous=True)._wandb_init["anonymous"] == "allow"  # asked for: kept
