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


# -- the λ and c sweep figures: the same style as the others ---------------------------------------
def _record(x, seed, auroc, val_acc, val_loss, logdet, acc=0.9):
    return {"run": f"{x}-{seed}", "x": x, "seed": seed, "accuracy": acc, "val_acc": val_acc, "val_loss": val_loss,
            "train_logdet": logdet, "results": {"dhm": {"svhn": {"auroc": auroc, "aupr_in": auroc - 0.05}}}}


#: λ = 1e-3 (two seeds), 1e-2 (two seeds), 1e-1 (one seed)
SWEEP = [_record(1e-3, 0, 0.90, 0.95, 0.2, 0.1), _record(1e-3, 1, 0.80, 0.93, 0.3, 0.2),
         _record(1e-2, 0, 0.70, 0.90, 1.0, 5.0), _record(1e-2, 1, 0.60, 0.88, 1.4, 7.0),
         _record(1e-1, 0, 0.50, 0.50, 9.0, 1000.0)]


def _band(ax):
    """The (x, lower, upper) of the axis' ± std band, read back from its polygon."""
    from matplotlib.collections import PolyCollection

    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    v = band.get_paths()[0].vertices
    xs = np.unique(v[:, 0])
    return xs, np.array([v[v[:, 0] == x, 1].min() for x in xs]), np.array([v[v[:, 0] == x, 1].max() for x in xs])


def test_lambda_figure_has_log_lambda_axes_mean_lines_and_std_bands():
    from ood_lightning.evaluation.sweep_plots import lambda_figure

    fig = lambda_figure(SWEEP)
    acc, loss, auroc, logdet = fig.axes
    assert len(fig.axes) == 4 and all(ax.get_xscale() == "log" for ax in fig.axes)
    assert all(ax.get_xlabel().startswith("λ") for ax in fig.axes)
    assert "(nats)" in loss.get_ylabel() and "(nats)" in logdet.get_ylabel() and "fraction" in acc.get_ylabel()
    assert logdet.get_yscale() == "log" and acc.get_yscale() == "linear"  # 0.15 .. 1000: three decades
    (line,) = [ln for ln in auroc.lines if ln.get_label() == "dhm: svhn"]
    np.testing.assert_allclose(line.get_xdata(), [1e-3, 1e-2, 1e-1])
    np.testing.assert_allclose(line.get_ydata(), [0.85, 0.65, 0.50])  # seed means by hand
    xs, lo, hi = _band(auroc)
    sd = np.std([0.9, 0.8], ddof=1)  # both two-seed points have this spread; one seed: none
    np.testing.assert_allclose(xs, [1e-3, 1e-2, 1e-1])
    np.testing.assert_allclose(lo, [0.85 - sd, 0.65 - sd, 0.5])
    np.testing.assert_allclose(hi, [0.85 + sd, 0.65 + sd, 0.5])
    assert any(ln.get_ydata()[0] == 0.5 and ln.get_linestyle() == ":" for ln in auroc.lines)  # chance
    labels = [t.get_text() for t in auroc.get_legend().get_texts()]
    assert labels == ["dhm: svhn", "paper's collapse threshold"]


def test_spectral_figure_panels_and_bands():
    from ood_lightning.evaluation.sweep_plots import spectral_figure

    records = [{**r, "x": c} for r, c in zip(SWEEP[:4], [1.0, 1.0, 3.0, 3.0])]
    fig = spectral_figure(records)
    acc, auroc, aupr = fig.axes
    assert [ax.get_xscale() for ax in fig.axes] == ["linear"] * 3
    assert all(ax.get_xlabel().startswith("spectral coefficient c") for ax in fig.axes)
    assert auroc.get_ylabel().startswith("AUROC") and aupr.get_ylabel().startswith("AUPR-in")
    xs, lo, hi = _band(aupr)
    sd = np.std([0.85, 0.75], ddof=1)
    np.testing.assert_allclose(lo, [0.80 - sd, 0.60 - sd])
    np.testing.assert_allclose(hi, [0.80 + sd, 0.60 + sd])


def test_every_figure_shares_one_style_and_leaves_the_global_style_alone(tmp_path, drawn):
    """The ROC panels, the heatmap and the sweep figures: same label and title sizes, grid, palette."""
    import matplotlib.pyplot as plt

    from ood_lightning.evaluation import style
    from ood_lightning.evaluation.sweep_plots import lambda_figure

    before = dict(plt.rcParams)
    rng = np.random.default_rng(0)
    roc_curves({"msp": {"id_test": rng.normal(1, 1, 50), "noise": rng.normal(0, 1, 50)}}, tmp_path / "roc.png")
    auroc_heatmap([{"group": "-", "detector": "msp", "ood_set": "noise", "auroc_mean": 0.9, "auroc_std": 0.0}],
                  tmp_path / "h.png")
    roc, heat = drawn[0].axes[0], drawn[1].axes[0]
    sweep = lambda_figure(SWEEP).axes[2]
    for ax in (roc, heat, sweep):
        assert ax.yaxis.label.get_fontsize() == style.RC["axes.labelsize"]
        assert ax.xaxis.get_ticklabels()[0].get_fontsize() == style.RC["xtick.labelsize"]
    assert roc.title.get_fontsize() == heat.title.get_fontsize() == style.RC["axes.titlesize"]
    assert roc.xaxis.get_gridlines()[0].get_visible() and sweep.xaxis.get_gridlines()[0].get_visible()
    assert roc.lines[0].get_color() == sweep.lines[0].get_color() == style.PALETTE[0]  # the first curve
    assert dict(plt.rcParams) == before
