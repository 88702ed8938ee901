"""docs/detectors.md is the output of ``python -m ood_lightning.detectors.table``: one table, from the
detector configs and classes, that cannot drift from them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import ood_lightning.detectors as detectors
from ood_lightning.core.errors import ConfigError
from ood_lightning.detectors.table import detector_classes, page

ROOT = Path(__file__).resolve().parents[1]


def test_committed_page_is_the_generated_one():
    assert (ROOT / "docs" / "detectors.md").read_text() == page(ROOT / "conf"), (
        "docs/detectors.md is stale: run `python -m ood_lightning.detectors.table > docs/detectors.md`")


def test_every_config_key_of_detectors_all_is_in_one_row():
    keys = [k for name in ("baselines.yaml", "all.yaml")
            for k in yaml.safe_load((ROOT / "conf" / "detectors" / name).read_text()) if k != "defaults"]
    rows = detector_classes(ROOT / "conf")
    assert sorted(k for ks in rows.values() for k in ks) == sorted(keys)
    assert rows[detectors.Mahalanobis] == ["mahalanobis", "mahalanobis_ensemble"]
    assert rows[detectors.ASH] == ["ash_p", "ash_b", "ash_s"]
    text = page(ROOT / "conf")
    assert text.count("\n| ") == len(rows) + 1  # the header and one row per class


def test_a_target_outside_the_detectors_package_is_refused(tmp_path):
    (tmp_path / "detectors").mkdir()
    (tmp_path / "detectors" / "baselines.yaml").write_text("x:\n  _target_: os.system\n")
    (tmp_path / "detectors" / "all.yaml").write_text("defaults: [baselines]\n")
    with pytest.raises(ConfigError, match="x._target_=os.system"):
        detector_classes(tmp_path)


def test_the_command_prints_the_page():
    out = subprocess.run([sys.executable, "-m", "ood_lightning.detectors.table", "--conf", str(ROOT / "conf")],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out == page(ROOT / "conf")
