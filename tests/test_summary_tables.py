"""The tables of ``evaluate.py run_dir=``: the overrides every run shares said once, each setting
named by what sets it apart, one unit (×100) in summary.md and compare.md alike."""

from __future__ import annotations

import json

import pytest
import yaml

from ood_lightning.evaluation.aggregate import aggregate, collect, setting_legend, write_summary
from ood_lightning.evaluation.sweep_plots import side_by_side

COMMON = ["experiment=posthoc_cifar10", "data.limit_test=500", "data.limit_ood=500", "evaluation.fit_limit=2000"]


def _job(path, overrides, auroc, accuracy=0.9):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    results = {det: {ood: {"auroc": auroc + d, "aupr_in": auroc, "fpr95": 0.5, "autc": 0.3}
                     for ood in ("svhn", "tin")} for det, d in (("msp", 0.0), ("dhm", 0.01))}
    (path / "metrics.json").write_text(json.dumps({"accuracy": accuracy, "results": results}))


def _table(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]


def test_a_sweep_names_each_setting_by_the_override_that_differs(tmp_path):
    for i, (lam, seed, auroc) in enumerate([("0.001", 0, 0.80), ("0.001", 1, 0.90), ("0.01", 0, 0.70)]):
        _job(tmp_path / str(i), [*COMMON, f"lambda={lam}", f"seed={seed}"], auroc)
    md, *_ = write_summary(tmp_path)
    text = md.read_text()
    assert text.count("data.limit_test=500") == 1  # said once, not on every row
    assert "Every run: `data.limit_ood=500 data.limit_test=500 evaluation.fit_limit=2000 " \
           "experiment=posthoc_cifar10`" in text
    rows = _table(text)
    assert rows[0] == ["setting", "detector", "OOD set", "n", "auroc", "aupr_in", "fpr95", "autc"]
    assert ["lambda=0.001", "msp", "svhn", "2", "85.0 ± 7.1", "85.0 ± 7.1", "50.0 ± 0.0", "30.0 ± 0.0"] in rows
    assert ["lambda=0.01", "dhm", "tin", "1", "71.0", "70.0", "50.0", "30.0"] in rows  # one run: no spread
    assert len(rows) == 1 + 2 * 2 * 2  # header + setting x detector x OOD set


def test_one_setting_has_no_setting_column(tmp_path):
    """A single post-hoc run with long overrides: one line per row, its overrides above the table."""
    _job(tmp_path, COMMON, 0.8)
    text = write_summary(tmp_path)[0].read_text()
    rows = _table(text)
    assert rows[0][0] == "detector" and ["msp", "svhn", "1", "80.0", "80.0", "50.0", "30.0"] in rows
    assert all(len("| " + " | ".join(r) + " |") < 80 for r in rows)


def test_long_differences_get_short_names_and_a_legend(tmp_path):
    long_a = ["backbone=cifar_resnet56_pretrained", "detectors.knn.k=50", "evaluation.epsilon_grid=[0.001,0.002]"]
    long_b = ["backbone=wrn28_10", "detectors.knn.k=200", "evaluation.epsilon_grid=[0.004]"]
    _job(tmp_path / "0", [*COMMON, *long_a], 0.8)
    _job(tmp_path / "1", [*COMMON, *long_b], 0.7)
    runs, _ = collect(tmp_path)
    legend = setting_legend(aggregate(runs))
    assert sorted(legend.labels.values()) == ["S1", "S2"] and sorted(legend.common) == sorted(COMMON)
    text = write_summary(tmp_path)[0].read_text()
    assert f"- S1: `{' '.join(sorted(long_a))}`" in text and f"- S2: `{' '.join(sorted(long_b))}`" in text
    assert {r[0] for r in _table(text)[1:]} == {"S1", "S2"}


def test_compare_uses_the_same_names_and_units_as_the_summary(tmp_path):
    for i, (lam, seed, auroc) in enumerate([("0.001", 0, 0.80), ("0.001", 1, 0.90), ("0.01", 0, 0.70)]):
        _job(tmp_path / str(i), [*COMMON, f"lambda={lam}", f"seed={seed}"], auroc, accuracy=0.9 + 0.01 * seed)
    runs, _ = collect(tmp_path)
    text = side_by_side(aggregate(runs), ["dhm", "msp"], ["auroc"])
    assert "**lambda=0.001** (2 seeds, test accuracy 90.5 ± 0.7)" in text
    assert "**lambda=0.01** (1 seed, test accuracy 90.0)" in text
    rows = _table(text)
    assert rows[0] == ["OOD set", "dhm auroc", "msp auroc"]
    assert ["svhn", "86.0 ± 7.1", "85.0 ± 7.1"] in rows and ["tin", "71.0", "70.0"] in rows
    assert all(float(c.split(" ± ")[0]) > 1 for r in rows if r[0] != "OOD set" for c in r[1:])  # ×100, no fractions


@pytest.mark.parametrize("groups", [["-"], ["a=1", "a=2"]])
def test_legend_of_one_or_two_settings(groups):
    rows = [{"group": g, "overrides": [] if g == "-" else [g, "b=3"]} for g in groups]
    legend = setting_legend(rows)
    assert legend.several == (len(groups) > 1)
    assert legend.common == ([] if groups == ["-"] else ["b=3"])
