"""The first screen of a run: no third-party notice about other products, no torch deprecation
that Lightning triggers, no 'FLOPs 0' table; the one-line parameter summary and the scoring plan instead."""

from __future__ import annotations

import logging
import warnings

import pytest

from ood_lightning.core.console import quiet_known_noise
from tests.conftest import TINY, run_script


def test_the_dropped_notices_are_exactly_the_known_ones(caplog):
    quiet_known_noise()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        log.info("GPU available: False, used: False")  # a real notice stays
    assert "litlogger" not in caplog.text and "GPU available" in caplog.text
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_known_noise()  # filters added after simplefilter win
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("some other FutureWarning", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["some other FutureWarning"]


@pytest.mark.slow
def test_a_run_s_console_has_no_known_noise(tmp_path):
    res = run_script("train.py", *TINY, "detectors=fast", f"hydra.run.dir={tmp_path}", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout + res.stderr
    for noise in ("litlogger", "LeafSpec", "FLOPs"):
        assert noise not in text, noise
    assert "model Classifier: backbone SmallCNN" in text and "scoring 1 OOD sets with 3 scorers" in text


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
