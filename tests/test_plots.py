"""Figures: the ROC panels of a run (one per OOD set) and the AUROC heatmap of a summary, checked
through the figure they draw (panels, curves, cell labels) and against scikit-learn's AUROC."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score

from ood_lightning.evaluation.plots import auroc_heatmap, roc_curves


@pytest.fixture
def drawn(monkeypatch):
    """The figures saved during the test."""
    figures = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self) or real(self, *a, **k))
    return figures


def test_roc_panels_one_per_ood_set_with_every_detector(tmp_path, drawn):
    rng = np.random.default_rng(0)
    scores = {det: {"id_val": rng.normal(size=20), "id_test": rng.normal(1, 1, 200),
                    "noise": rng.normal(0, 1, 150), "blobs": rng.normal(-1, 1, 150), "tin": rng.normal(0.5, 1, 150)}
              for det in ("msp", "energy")}
    path = roc_curves(scores, tmp_path / "roc.png")
    assert path.stat().st_size > 10_000
    (fig,) = drawn
    assert len(fig.axes) == 3  # noise, blobs, tin; the fourth grid cell is removed
    ax = fig.axes[1]
    assert ax.get_title() == "ID test vs blobs" and len(ax.lines) == 3  # two detectors + the chance line
    label = ax.get_legend().get_texts()[0].get_text()
    truth = roc_auc_score(np.r_[np.ones(200), np.zeros(150)], np.r_[scores["msp"]["id_test"], scores["msp"]["blobs"]])
    assert label == f"msp ({100 * truth:.1f})"


def test_heatmap_cells_are_mean_and_std_of_the_summary(tmp_path, drawn):
    rows = [{"group": "-", "detector": d, "ood_set": o, "auroc_mean": m, "auroc_std": s}
            for d, o, m, s in [("msp", "noise", 0.9, 0.01), ("msp", "tin", 0.8, 0.02), ("dhm", "noise", 0.95, 0.0),
                               ("dhm", "tin", 0.7, 0.05)]]
    rows.append({"group": "other", "detector": "msp", "ood_set": "noise", "auroc_mean": 0.1, "auroc_std": 0.0})
    auroc_heatmap(rows, tmp_path / "h.png")
    (fig,) = drawn
    heat = fig.axes[0]
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    cells = sorted(t.get_text() for t in heat.texts)
    assert cells == sorted(["90.0±1.0", "80.0±2.0", "95.0±0.0", "70.0±5.0"])  # the other group is not drawn
    assert [t.get_text() for t in heat.get_yticklabels()] == ["msp", "dhm"]
