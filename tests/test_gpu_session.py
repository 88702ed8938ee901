"""benchmarks/gpu_session.{sh,py} on a CPU: argument parsing, the budget split, the dry run (the plan and
the report, nothing trained), reading each step's figures from outputs in the format the tools write."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_session", ROOT / "benchmarks" / "gpu_session.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sh(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_arguments_are_checked_with_one_clear_line():
    gs = _module()
    with pytest.raises(SystemExit):
        gs.parse(["run", "--steps", "throughput,bogus"])
    with pytest.raises(SystemExit):
        gs.parse(["run", "--budget-s", "0"])
    args = gs.parse(["run", "--steps", "dhm_epoch, cuda_tests", "--out", "x"])
    assert args.steps == ["dhm_epoch", "cuda_tests"] and str(args.out) == "x"
    bad = _sh("bogus")
    assert bad.returncode == 2 and "usage:" in bad.stderr


def test_dry_run_writes_the_plan_and_both_reports_within_the_budget(tmp_path):
    res = _sh("run", "--dry-run", "--out", str(tmp_path), "--budget-s", "570")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_session.json").read_text())
    steps = report["steps"]
    assert [s["step"] for s in steps] == ["throughput", "dhm_epoch", "classifier", "cuda_tests"]
    assert all(s["status"] == "dry run (not run)" for s in steps)
    # the plan's worst case (every step at its limit) fills the budget exactly, in the shares
    assert sum(s["limit_s"] for s in steps) == pytest.approx(570, abs=0.5)
    assert [s["limit_s"] for s in steps] == pytest.approx([570 * f for f in (0.30, 0.25, 0.33, 0.12)], abs=0.5)
    cmd = {s["step"]: s["command"] for s in steps}
    assert "benchmarks/throughput.py --rows a,b,c" in cmd["throughput"]
    assert "experiment=dhm_cifar10 trainer.max_epochs=1" in cmd["dhm_epoch"]
    assert "max_time={seconds:" in cmd["classifier"] and "experiment=classifier_cifar10 backbone=resnet18" in cmd["classifier"]
    assert "test_compile_true_on_gpu_runs_end_to_end" in cmd["cuda_tests"]
    md = (tmp_path / "gpu_session.md").read_text()
    assert "(dry run: nothing ran)" in md and md.count("| dry run (not run) |") == 4
    assert "===== classifier:" in (tmp_path / "gpu_session.log").read_text()


def test_the_classifier_gets_what_the_earlier_steps_left(tmp_path):
    gs = _module()
    args = gs.parse(["run", "--dry-run", "--out", str(tmp_path)])
    # 300 s in hand for the classifier: 300 - 120 s kept for evaluation and LDE = 180 s of training
    cmds = gs.commands(args, "classifier", 300, tmp_path)
    assert "+trainer.max_time={seconds:180}" in cmds[0] and "method=lde" in cmds[1]
    assert f"backbone.checkpoint={tmp_path / 'classifier' / 'checkpoints' / 'last.ckpt'}" in cmds[1]


def test_figures_are_read_from_what_the_tools_write(tmp_path):
    gs = _module()
    (tmp_path / "throughput.json").write_text(json.dumps(
        {"results": {"a": {"images_per_s": 10000.0}, "b": {"images_per_s": 9100.0}, "c": {"images_per_s": 7000.0}}}))
    figs = gs.figures("throughput", tmp_path, tmp_path / "log")
    assert figs["b_over_a"] == 0.91 and figs["c_over_a"] == 0.7
    log = ("===== dhm_epoch: python train.py\n[INFO] epoch 1/1: 176 steps in 1.5 min (2.0/s)\n"
           "===== classifier: python train.py\nepoch 1/200: 98 steps in 21 s (4.6/s)\nepoch 2/200: 98 steps in 19 s\n")
    assert gs.epoch_line(log, "dhm_epoch") == {"last_epoch": 1, "epoch_steps": 176, "epoch_s": 90.0}
    assert gs.epoch_line(log, "classifier") == {"last_epoch": 2, "epoch_steps": 98, "epoch_s": 19.0}
    assert gs.epoch_line(log, "cuda_tests") == {}


def test_prepare_copies_the_wheels_and_the_data(tmp_path):
    shared = tmp_path / "shared"
    (shared / "device-wheels").mkdir(parents=True)
    (shared / "device-wheels" / "a-1.0-py3-none-any.whl").write_bytes(b"w")
    (shared / "data").mkdir()
    for name in ("cifar10-train.npz", "cifar10-test.npz"):
        (shared / "data" / name).write_bytes(b"d")
    dest = tmp_path / "device"
    res = _sh("prepare", env={"SHARED": str(shared), "DEVICE_DIR": str(dest)})
    assert res.returncode == 0, res.stderr
    assert (dest / "wheels" / "a-1.0-py3-none-any.whl").exists() and (dest / "data" / "cifar10-test.npz").exists()
    (shared / "data" / "cifar10-test.npz").unlink()
    res = _sh("prepare", env={"SHARED": str(shared), "DEVICE_DIR": str(dest)})
    assert res.returncode == 1 and "cifar10-test.npz not found" in res.stderr
