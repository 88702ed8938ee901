"""benchmarks/cpu_speed.py and cpu_threads.py: their ratios and verdicts from given figures, and a
tiny end-to-end run of the one-process benchmark (no timing assertion: figures only)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_speed_ratios_are_medians_of_per_round_ratios_and_judged_on_cpu_time():
    cs = _load("cpu_speed")
    args = SimpleNamespace(tiny=False, backbone="cifar_resnet20", batch_size=128, eval_batch_size=512, eval_images=1024,
                           rounds=3, steps=4, precisions=["fp32"], rows=["plain", "classifier", "dhm"])
    results = {"threads": 1, "load_before": 3.0, "load_after": 4.0,
               "rates": {"plain/fp32": [100, 50, 100], "classifier/fp32": [80, 50, 95], "dhm/fp32": [60, 30, 70]},
               "cpu_rates": {"plain/fp32": [100, 100, 100], "classifier/fp32": [92, 91, 95], "dhm/fp32": [70, 74, 80]}}
    text = cs.report(args, results)
    # wall: classifier 0.8, 1.0, 0.95 -> median 0.95; CPU: 0.92, 0.91, 0.95 -> 0.92 (met); dhm CPU 0.74 (missed)
    assert "| fp32 | classifier | 80.0 | 92.0 | 0.95 | 0.92 | plain x 0.9: met |" in text
    assert "| fp32 | dhm | 60.0 | 74.0 | 0.60 | 0.74 | plain x 0.75: MISSED |" in text
    assert "load average 3.0 -> 4.0" in text


def test_cpu_speed_refuses_unknown_rows_and_precisions():
    cs = _load("cpu_speed")
    with pytest.raises(SystemExit):
        cs.parse(["--rows", "plain,bogus"])
    with pytest.raises(SystemExit):
        cs.parse(["--precisions", "fp16"])
    assert cs.parse(["--precisions", "fp32,bf16"]).precisions == ["fp32", "bf16"]


def test_cpu_threads_table_takes_the_median_per_setting():
    ct = _load("cpu_threads")
    rows = [{"threads": 1, "wait_policy": "default", "loaded_with": 0, "load_1min": 2.0, "train_fp32": 10.0,
             "infer_fp32": 40.0},
            {"threads": 1, "wait_policy": "default", "loaded_with": 0, "load_1min": 3.0, "train_fp32": 30.0,
             "infer_fp32": 20.0},
            {"threads": 2, "wait_policy": "PASSIVE", "loaded_with": 2, "load_1min": 5.0, "train_fp32": 7.0,
             "infer_fp32": 9.0}]
    text = ct.table(rows)
    assert "| 1 | default | 0 | 2.0, 3.0 | 20 | - | 30 | - |" in text
    assert "| 2 | PASSIVE | 2 | 5.0 | 7 | - | 9 | - |" in text


@pytest.mark.slow
def test_cpu_speed_runs_end_to_end_on_a_tiny_model(tmp_path):
    cs = _load("cpu_speed")
    out = cs.main(["--tiny", "--steps", "1", "--warmup", "1", "--rounds", "1", "--eval-images", "64",
                   "--precisions", "fp32", "--markdown", str(tmp_path / "t.md")])
    assert set(out["rates"]) == {f"{r}/fp32" for r in ("plain", "classifier", "dhm", "plain_eval", "extract")}
    assert all(v[0] > 0 for v in out["cpu_rates"].values())
    assert "| fp32 | extract |" in (tmp_path / "t.md").read_text()


def test_precision_auroc_compares_both_runs_and_writes_its_block_in_place(tmp_path):
    import json

    pa = _load("precision_auroc")
    for precision, auroc in (("fp32", [0.9, 0.8]), ("bf16", [0.901, 0.795])):
        (tmp_path / precision).mkdir()
        results = {"msp": {"tin_crop": {"auroc": auroc[0], "fpr95": 0.5}, "mean_far": {"auroc": auroc[1], "fpr95": 0.6}},
                   "knn": {"tin_crop": {"auroc": 0.7, "fpr95": 0.7}}}
        if precision == "bf16":
            del results["knn"]  # a detector one run lacks is left out, not compared with nothing
        (tmp_path / precision / "metrics.json").write_text(json.dumps({"results": results, "accuracy": 0.9}))
    doc = tmp_path / "page.md"
    doc.write_text("# Page\n\n<!-- precision_auroc:begin -->\nold\n<!-- precision_auroc:end -->\n\nafter\n")
    pa.main(["--only-write", "--out", str(tmp_path), "--doc", str(doc), "--fit", "10"])
    text = doc.read_text()
    assert "old" not in text and text.endswith("after\n") and text.count("precision_auroc:begin") == 1
    assert "| msp | tin_crop | 90.00 | 90.10 | +0.100 | 50.00 | 50.00 | +0.00 |" in text
    assert "| msp | mean_far | 80.00 | 79.50 | -0.500 |" in text
    assert "Largest |AUROC difference| 0.500 points" in text and "knn" not in text
