"""Restartable sweeps and W&B for sweeps.

``skip_finished=true``: a re-launched sweep skips the jobs whose metrics.json holds the same
config hash (file untouched, one line saying so), runs the others (a failed job, a changed
value, a truncated metrics.json), and a job that left a checkpoint of the same config resumes
from it. W&B: a multirun's runs share the sweep folder's name as their group and are named by
their swept overrides; the aggregation logs the summary as a W&B Table (offline, no account).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil

import lightning as L
import pytest
import yaml

from ood_lightning.run.finished import HASH_KEY, config_hash
from ood_lightning.run.runs import train
from tests.conftest import TINY, compose_cfg, run_script

pytestmark = pytest.mark.usefixtures("single_thread")

#: the fastest tiny run: no detectors, no loggers, no progress bar
_FAST = [*TINY, "detectors=none", "logger=none", "callbacks.progress_bar=null", "callbacks.cost_projection=null"]
FAIL_ENV = "OOD_LIGHTNING_TEST_FAIL_SEED"


class FailAtEpoch(L.Callback):
    """Raises at the start of epoch ``epoch`` in the job whose seed is in ``$OOD_LIGHTNING_TEST_FAIL_SEED``
    (a crash from outside the config: the re-launch has the same config, hence the same hash)."""

    def __init__(self, seed: int, epoch: int = 1):
        self.seed, self.epoch = seed, epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if os.environ.get(FAIL_ENV) == str(self.seed) and trainer.current_epoch == self.epoch:
            raise RuntimeError(f"injected failure in epoch {self.epoch}")


def _skip_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("skip_finished: skipped")]


def test_config_hash_leaves_out_paths_and_runtime_keys_only(tmp_path):
    base = config_hash(compose_cfg("train", _FAST, tmp_path / "a"))
    moved = compose_cfg("train", [*_FAST, f"paths.cache_dir={tmp_path / 'c'}", f"paths.data_root={tmp_path / 'd'}",
                                  "ckpt_path=x.ckpt", "skip_finished=true"], tmp_path / "b")
    assert config_hash(moved) == base  # another folder, cache, data root, resume point: the same job
    for change in ("seed=1", "data.n_train=1000", "trainer.max_epochs=2", "logger=csv"):
        assert config_hash(compose_cfg("train", [*_FAST, change], tmp_path / "a")) != base, change


def test_skip_finished_trusts_only_a_valid_metrics_json_of_the_same_config(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ood_lightning")
    out = tmp_path / "job"
    first = train(compose_cfg("train", _FAST, out))
    metrics = out / "metrics.json"
    stored = json.loads(metrics.read_text())
    assert stored[HASH_KEY] == config_hash(compose_cfg("train", _FAST, out))
    stamp = metrics.stat().st_mtime_ns

    caplog.clear()
    again = train(compose_cfg("train", [*_FAST, "skip_finished=true"], out))
    assert metrics.stat().st_mtime_ns == stamp and again["results"] == first["results"]
    assert len(_skip_lines(caplog)) == 1 and str(metrics) in _skip_lines(caplog)[0]
    assert not (out / "stale").exists()  # nothing was moved: the job never started

    caplog.clear()  # a changed value is another job: it runs (the old results move to stale/)
    train(compose_cfg("train", [*_FAST, "skip_finished=true", "data.n_train=1000"], out))
    assert metrics.stat().st_mtime_ns != stamp and not _skip_lines(caplog)
    assert "written for another config" in caplog.text

    metrics.write_text(metrics.read_text()[:40])  # truncated: never trusted
    stamp = metrics.stat().st_mtime_ns
    caplog.clear()
    train(compose_cfg("train", [*_FAST, "skip_finished=true", "data.n_train=1000"], out))
    assert metrics.stat().st_mtime_ns != stamp and not _skip_lines(caplog)
    assert json.loads(metrics.read_text())["results"] == {}  # a whole file again (detectors=none)
    assert "not trusted (unreadable" in caplog.text


def test_unfinished_job_resumes_from_its_checkpoint_of_the_same_config(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ood_lightning")
    out = tmp_path / "job"
    train(compose_cfg("train", _FAST, out))
    (out / "metrics.json").unlink()  # killed after the checkpoint, before the results
    caplog.clear()
    train(compose_cfg("train", [*_FAST, "skip_finished=true"], out))
    assert f"resuming from {out / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert (out / "metrics.json").exists()

    (out / "metrics.json").unlink()  # the newest checkpoint of the config wins (here a SLURM requeue's)
    hpc = out / "hpc_ckpt_1.ckpt"
    shutil.copy(out / "checkpoints" / "last.ckpt", hpc)
    later = (out / "checkpoints" / "last.ckpt").stat().st_mtime + 10
    os.utime(hpc, (later, later))
    caplog.clear()
    train(compose_cfg("train", [*_FAST, "skip_finished=true"], out))
    assert f"resuming from {hpc}" in caplog.text

    (out / "metrics.json").unlink()  # a checkpoint of another config is not resumed
    caplog.clear()
    train(compose_cfg("train", [*_FAST, "skip_finished=true", "seed=3"], out))
    assert "resuming from" not in caplog.text and "not resumed" in caplog.text


@pytest.mark.slow
def test_relaunched_sweep_skips_finished_jobs_and_reruns_the_failed_one(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    fail = "+callbacks.fail={_target_: tests.test_sweeps.FailAtEpoch, seed: '${seed}'}"
    args = [*_FAST, "trainer.max_epochs=2", fail, "seed=0,1,2", f"hydra.sweep.dir={sweep}"]
    monkeypatch.setenv(FAIL_ENV, "1")
    res = run_script("train.py", "-m", *args)
    assert res.returncode == 1, res.stderr[-3000:]  # job 1 failed in its 2nd epoch, after last.ckpt of the 1st
    assert (sweep / "1" / "failed.json").exists() and (sweep / "1" / "checkpoints" / "last.ckpt").exists()
    stamps = {j: (sweep / j / "metrics.json").stat().st_mtime_ns for j in ("0", "2")}
    from ood_lightning.run.loggers import swept_keys

    assert swept_keys(sweep / "multirun.yaml") == {"seed"}  # Hydra's own multirun.yaml: what W&B names runs by

    monkeypatch.delenv(FAIL_ENV)
    res = run_script("train.py", "-m", *args, "skip_finished=true")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    for j in ("0", "2"):
        assert (sweep / j / "metrics.json").stat().st_mtime_ns == stamps[j]
        assert f"skip_finished: skipped, {sweep / j / 'metrics.json'} already holds" in out
    assert out.count("skip_finished: skipped") == 2
    assert f"skip_finished: resuming from {sweep / '1' / 'checkpoints' / 'last.ckpt'}" in out
    resumed = json.loads((sweep / "1" / "metrics.json").read_text())
    assert not (sweep / "1" / "failed.json").exists() and resumed["epochs"] == 2

    # the re-run job equals the job of a clean sweep (the same config, never interrupted)
    clean = train(compose_cfg("train", [o for o in args if not o.startswith(("seed=", "hydra."))] + ["seed=1"],
                              tmp_path / "clean"))
    assert resumed["results"] == clean["results"] and resumed["accuracy"] == clean["accuracy"]


# -- W&B ------------------------------------------------------------------------------------------
@pytest.fixture
def wandb_offline(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    if wandb.run is not None:  # a run another test left open in this process would be reused
        wandb.finish()
    yield
    if wandb.run is not None:
        wandb.finish()


def test_wandb_run_of_a_sweep_job_is_grouped_by_sweep_and_named_by_its_overrides(tmp_path, wandb_offline):
    from ood_lightning.run.loggers import build_loggers

    sweep = tmp_path / "2026-12-02_14-00-00"
    sweep.mkdir()
    # what Hydra writes before the jobs run: the sweep's own overrides
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": [
        "logger=wandb", "lambda=0.1,0.2", "seed=0,1"]}, "sweeper": {"params": None}}}))
    cfg = compose_cfg("train", ["logger=wandb", "lambda=0.2", "seed=1", "hydra.mode=MULTIRUN",
                                f"hydra.sweep.dir={sweep}"], sweep / "3")
    (logger,) = build_loggers(cfg)
    run = logger.experiment  # an offline wandb run
    assert run.group == "2026-12-02_14-00-00" and run.name == "lambda=0.2,seed=1"

    single = compose_cfg("train", ["logger=wandb", "seed=1"], tmp_path / "single")
    (logger,) = build_loggers(single)  # a single run keeps W&B's own naming
    assert logger._wandb_init.get("group") is None and logger._wandb_init.get("name") is None


def test_aggregation_logs_the_summary_as_a_wandb_table(tmp_path, wandb_offline):
    import evaluate
    from tests.test_run_dir import _job, _metrics

    sweep = tmp_path / "sweep"
    _job(sweep / "0", ["seed=0"], metrics=_metrics(0.8))
    _job(sweep / "1", ["seed=1"], metrics=_metrics(0.6))
    evaluate.evaluate(compose_cfg("evaluate", [f"run_dir={sweep}", "logger=wandb"], tmp_path / "agg"))
    import wandb

    assert wandb.run.group == "sweep" and wandb.run.name == "summary"
    wandb.finish()
    (table,) = (tmp_path / "agg" / "wandb").glob("offline-run-*/files/media/table/summary_*.table.json")
    logged = json.loads(table.read_text())
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert logged["columns"] == list(rows[0].keys())
    assert len(logged["data"]) == len(rows) == 1
    row = dict(zip(logged["columns"], logged["data"][0]))
    assert row["detector"] == "msp" and row["n"] == 2 and row["auroc_mean"] == pytest.approx(0.7)
    assert row["auroc_mean"] == pytest.approx(float(rows[0]["auroc_mean"]))
