"""The results page of post-hoc runs (sweeps/posthoc_report.py) from a hand-written metrics.json."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_page_shows_every_metric_the_fit_size_and_the_chosen_epsilon(tmp_path) -> None:
    sys.path.insert(0, str(ROOT / "sweeps"))
    try:
        report = importlib.import_module("posthoc_report")
    finally:
        sys.path.remove(str(ROOT / "sweeps"))
    metrics = {"accuracy": 0.8103, "fit_samples": 45000, "fit_augmented": False,
               "selected": {"odin": {"epsilon": 0.0025, "mean_id_val_score": {"0.0025": 0.5}}, "knn": {"k": 50}},
               "timings_s": {"features/id_train": 12.5},
               "results": {"msp": {"tin_crop": {"auroc": 0.788, "fpr95": 0.6123, "aupr_in": 0.9},
                                   "mean_far": {"auroc": 0.7}},
                           "odin": {"tin_crop": {"auroc": 0.913, "fpr95": 0.4, "aupr_in": 0.95}}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    page = "\n".join(report.section("ResNet-20", tmp_path))
    assert "ID test accuracy 81.03%" in page
    assert "| msp | 78.8 |" in page and "| msp | 61.2 |" in page and "| odin | 95.0 |" in page
    assert "mean_far" not in page  # summaries are not a column
    assert "fitted on 45,000 ID training inputs." in page
    assert "ε chosen on ID validation (pixel units): odin 0.0025." in page  # knn chose no ε: not listed
    assert "| features/id_train | 12.5 |" in page
