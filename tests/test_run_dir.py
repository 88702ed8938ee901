"""A run directory's state is never ambiguous: a failed re-run is never reported with the old
numbers, aggregation names every job that failed, broke or did not finish (with its overrides
and error), and a sweep with failed jobs exits non-zero after every job ran."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from ood_lightning.evaluation.aggregate import collect, write_summary
from ood_lightning.run.cli import run_safely
from ood_lightning.run.runs import train
from tests.conftest import TINY, compose_cfg, run_script


def _job(path, overrides, metrics=None, failed=None, metrics_text=None):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if metrics_text is not None:
        (path / "metrics.json").write_text(metrics_text)
    if failed is not None:
        (path / "failed.json").write_text(json.dumps({"error": failed, "traceback": "Traceback ...\n"}))


def _metrics(auroc, accuracy=0.9):
    return {"accuracy": accuracy, "results": {"msp": {"svhn": {"auroc": auroc, "aupr_in": auroc, "fpr95": 0.5,
                                                                 "autc": 0.3}}}}


def test_failed_rerun_in_a_used_directory_is_never_reported_with_the_old_numbers(tmp_path, capsys):
    """An earlier run's results in the directory, then a run there that fails."""
    out = tmp_path / "run"
    _job(out, ["seed=0"], metrics=_metrics(0.97))
    np.savez(out / "scores.npz", msp=np.ones(3))
    (out / "failed.json").write_text("{}")  # and an older failure
    cfg = compose_cfg("train", [*TINY, "data.known_classes=[5]"], out)  # fails when the data is read
    with pytest.raises(SystemExit):
        run_safely(train, cfg)
    assert not (out / "metrics.json").exists() and not (out / "scores.npz").exists()
    assert json.loads((out / "failed.json").read_text())["error"].startswith("ConfigError: data.known_classes=[5]")
    stale = list((out / "stale").rglob("metrics.json"))
    assert len(stale) == 1 and json.loads(stale[0].read_text())["results"]["msp"]["svhn"]["auroc"] == 0.97
    runs, failed = collect(out)
    assert runs == [] and [f.path for f in failed] == [out]


def test_failed_json_wins_over_metrics_json(tmp_path):
    """A directory with both (an old tool version's stale metrics, or a report that failed after the
    results): the run is reported failed, not as a success."""
    _job(tmp_path / "0", ["seed=0"], metrics=_metrics(0.8), failed="RuntimeError: boom")
    _job(tmp_path / "1", ["seed=1"], metrics=_metrics(0.9))
    runs, failed = collect(tmp_path)
    assert [r["run"] for r in runs] == [str(tmp_path / "1")] and [f.path for f in failed] == [tmp_path / "0"]


def test_summary_names_failed_broken_and_unfinished_jobs_and_keeps_the_rest(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep).mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"task": ["seed=0,1,2,3,4,5", "lambda=0.1"]}}}))
    _job(sweep / "0", ["seed=0", "lambda=0.1"], metrics=_metrics(0.8))
    _job(sweep / "1", ["seed=1", "lambda=0.1"], metrics=_metrics(0.9))
    _job(sweep / "2", ["seed=2", "lambda=0.1"], failed="NonFiniteLossError: non-finite loss at epoch 3\nmore")
    _job(sweep / "3", ["seed=3", "lambda=0.1"])  # killed: neither file
    _job(sweep / "4", ["seed=4", "lambda=0.1"], metrics_text='{"accuracy": 0.9, "resu')  # truncated
    # job 5 never started (the sweep was killed): no folder at all
    md, _, rows, failed = write_summary(sweep)
    text = md.read_text()
    assert "2 runs" in text
    msp = next(r for r in rows if r["detector"] == "msp")
    assert msp["n"] == 2 and msp["auroc_mean"] == pytest.approx(0.85)
    lines = text.splitlines()
    failed_line = next(line for line in lines if str(sweep / "2") in line)
    assert "lambda=0.1 seed=2" in failed_line and "NonFiniteLossError: non-finite loss at epoch 3" in failed_line
    assert "more" not in failed_line  # the error's first line only
    broken = next(line for line in lines if str(sweep / "4" / "metrics.json") in line)
    assert "unreadable" in broken and "seed=4" in broken
    unfinished = next(line for line in lines if str(sweep / "3") in line)
    assert "did not finish" in text and "seed=3" in unfinished
    assert "1 job of 6 never started" in text


def test_single_run_directory_says_no_spread(tmp_path):
    _job(tmp_path, [], metrics=_metrics(0.8123))
    md, *_ = write_summary(tmp_path)
    text = md.read_text()
    assert "1 run: no spread" in text and "±" not in text and "81.2" in text


def test_summary_files_are_written_atomically(tmp_path, monkeypatch):
    """A crash while the summary is written leaves the previous summary, not half a file."""
    import ood_lightning.core.io as io_module

    _job(tmp_path / "0", ["seed=0"], metrics=_metrics(0.8))
    md, csv_path, *_ = write_summary(tmp_path)
    before = md.read_text(), csv_path.read_text()
    _job(tmp_path / "1", ["seed=1"], metrics=_metrics(0.9))
    real_replace = io_module.os.replace
    monkeypatch.setattr(io_module.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        write_summary(tmp_path)
    monkeypatch.setattr(io_module.os, "replace", real_replace)
    assert (md.read_text(), csv_path.read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "summary.csv", "summary.md"]


@pytest.mark.slow
def test_sweep_with_a_failed_job_exits_non_zero_after_every_job_and_names_it(tmp_path):
    """Job 1 fails when its data is read; job 0 finishes, and the sweep still exits 1."""
    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith("data.val_size")]
    res = run_script("train.py", "-m", *tiny, "detectors=none", "logger=none", "data.val_size=200,100000",
                     f"hydra.sweep.dir={sweep}")
    assert res.returncode == 1, res.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").exists() and (sweep / "1" / "failed.json").exists()
    tail = res.stderr[res.stderr.index("1 of 2 jobs failed"):]
    assert "data.val_size=100000" in tail and "ConfigError: data.val_size=100000 must leave both" in tail
    assert str(sweep / "1") in tail and str(sweep / "0") not in tail
    assert "Traceback" not in res.stderr


def test_sweep_figures_skip_failed_and_damaged_runs(tmp_path):
    """evaluate.py run_dir=... plot=...: the figure's records come from the same reading as the summary."""
    from ood_lightning.evaluation.sweep_plots import collect_sweep

    _job(tmp_path / "0", ["lambda=0.1", "seed=0"], metrics=_metrics(0.8))
    _job(tmp_path / "1", ["lambda=0.1", "seed=1"], metrics_text='{"results": {"ms')
    _job(tmp_path / "2", ["lambda=0.2", "seed=0"], metrics=_metrics(0.7), failed="RuntimeError: boom")
    _job(tmp_path / "stale" / "old", ["lambda=0.3"], metrics=_metrics(0.1))
    records = collect_sweep(tmp_path, "lambda")
    assert [(r["run"], r["x"]) for r in records] == [(str(tmp_path / "0"), 0.1)]
