"""Figures: the ROC panels of a run (one per OOD set), its score histograms, the AUROC heatmap of a
summary and the sweep figures, checked through the figure they draw (panels, curves, cell labels,
legend entries, where text and legends lie) and against scikit-learn's AUROC and numpy's counts."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score

from ood_lightning.evaluation.plots import auroc_heatmap, roc_curves, score_histograms


def _draw(fig):
    """Lay out and draw ``fig`` (closed by ``save``: on a fresh Agg canvas); returns the renderer."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def assert_nothing_cut_off(fig):
    """Every artist (titles, captions, tick labels, legends outside the axes) lies inside the figure."""
    box = fig.get_tightbbox(_draw(fig))  # inches
    width, height = fig.get_size_inches()
    assert box.x0 >= -0.01 and box.y0 >= -0.01 and box.x1 <= width + 0.01 and box.y1 <= height + 0.01, (box, width, height)


def assert_legend_covers_no_axes(fig, legend):
    _draw(fig)
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes), legend


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
    for ax in fig.axes:
        assert_legend_covers_no_axes(fig, ax.get_legend())
    assert_nothing_cut_off(fig)


def test_roc_panels_show_a_detector_tuned_on_each_ood_set_and_tell_ten_detectors_apart(tmp_path, drawn):
    """A detector tuned on part of each OOD set has no plain id_test: its curve for a set comes from its
    scores of that set's fit. Ten detectors outrun the seven colours: every (colour, dashes) pair differs."""
    rng = np.random.default_rng(1)
    scores = {f"det{i}": {"id_test": rng.normal(1, 1, 100), "noise": rng.normal(0, 1, 80),
                          "blobs": rng.normal(0, 1, 80)} for i in range(9)}
    tuned = {"id_test@noise": rng.normal(2, 1, 100), "noise@noise": rng.normal(0, 1, 60),
             "id_test@blobs": rng.normal(0.5, 1, 100), "blobs@blobs": rng.normal(0, 1, 60)}
    scores["maha_tuned"] = tuned
    roc_curves(scores, tmp_path / "roc.png")
    (fig,) = drawn
    assert [ax.get_title() for ax in fig.axes] == ["ID test vs noise", "ID test vs blobs"]
    for ax, ood in zip(fig.axes, ("noise", "blobs")):
        curves = [ln for ln in ax.lines if ln.get_label() and not ln.get_label().startswith("_")]
        assert len(curves) == 10
        assert len({(ln.get_color(), ln.get_linestyle()) for ln in curves}) == 10
        truth = roc_auc_score(np.r_[np.ones(100), np.zeros(60)], np.r_[tuned[f"id_test@{ood}"], tuned[f"{ood}@{ood}"]])
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert f"maha_tuned, uses OOD data ({100 * truth:.1f})" in labels
        assert_legend_covers_no_axes(fig, ax.get_legend())
    assert_nothing_cut_off(fig)


def test_histograms_say_how_many_scores_lie_off_the_axis_and_draw_none_at_its_edge(tmp_path, drawn):
    """Far-off OOD scores (Mahalanobis on noise) are not piled into the edge bin: the legend counts them,
    and the drawn area is the fraction of each split on the axis."""
    rng = np.random.default_rng(2)
    id_test = rng.normal(0, 1, 400)
    far = np.r_[rng.normal(-500, 10, 150), rng.normal(0, 1, 50)]  # 150 of 200 far left
    scores = {"maha": {"id_val": rng.normal(0, 1, 50), "id_test": id_test, "noise": far, "near": rng.normal(0.5, 1, 100)},
              "tuned": {"id_test@noise": rng.normal(0, 1, 60), "noise@noise": rng.normal(-1, 1, 60)}}
    score_histograms(scores, tmp_path / "scores.png")
    (fig,) = drawn
    assert [ax.get_title() for ax in fig.axes] == ["maha (higher = in-distribution)",
                                                  "tuned, tuned on part of noise (higher = in-distribution)"]
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    below, above = int((far < lo).sum()), int((far > hi).sum())
    assert below >= 150 and f"noise ({below + above} of 200 off the axis, left)" in labels
    assert "ID test" in labels[0] and "near" in labels  # nothing of them off the axis: no note
    noise = next(p for p in ax.patches if p.get_label().startswith("noise"))
    xy = noise.get_xy()  # the step outline: its area is the drawn density's integral
    area = np.trapezoid(xy[:, 1], xy[:, 0]) if xy[0, 0] < xy[-1, 0] else -np.trapezoid(xy[:, 1], xy[:, 0])
    assert area == pytest.approx(((far >= lo) & (far <= hi)).mean(), rel=1e-6)
    assert_legend_covers_no_axes(fig, ax.get_legend())
    assert_nothing_cut_off(fig)


def _row(group, overrides, det, ood, mean, std, n):
    return {"group": group, "overrides": overrides, "detector": det, "ood_set": ood, "auroc_mean": mean,
            "auroc_std": std, "n": n}


def test_heatmap_draws_every_setting_with_its_cells_and_a_scale_below_chance(tmp_path, drawn):
    common = ["debug=fast", "experiment=dhm_tiny"]
    rows = [_row(f"{' '.join(common)} lambda={lam}", [*common, f"lambda={lam}"], d, o, m, s, n)
            for lam, d, o, m, s, n in [("0.001", "msp", "noise", 0.9, 0.01, 3), ("0.001", "msp", "tin", 0.8, 0.02, 3),
                                       ("0.001", "dhm", "noise", 0.95, 0.0, 3), ("0.001", "dhm", "tin", 0.7, 0.05, 3),
                                       ("0.01", "msp", "noise", 0.364, 0.0, 1), ("0.01", "dhm", "tin", 0.6, 0.0, 1)]]
    auroc_heatmap(rows, tmp_path / "h.png")
    (fig,) = drawn
    first, second, bar = fig.axes
    assert first.get_title() == "lambda=0.001" and second.get_title() == "lambda=0.01"
    assert sorted(t.get_text() for t in first.texts) == sorted(["90.0±1.0", "80.0±2.0", "95.0±0.0", "70.0±5.0"])
    assert sorted(t.get_text() for t in second.texts) == ["36.4", "60.0"]  # single runs: no "±0.0"
    assert [t.get_text() for t in first.get_yticklabels()] == ["msp", "dhm"]
    assert bar.get_ylim()[0] <= 36.4 and bar.get_ylim()[1] == 100  # 36.4 is not shown as 50
    assert "debug=fast experiment=dhm_tiny" in fig.get_supxlabel()  # the shared overrides, once
    assert_nothing_cut_off(fig)


def test_heatmap_of_a_long_setting_keeps_its_title_and_caption_inside(tmp_path, drawn):
    overrides = ["experiment=posthoc_cifar10", "data.limit_test=500", "data.limit_ood=500", "evaluation.fit_limit=2000",
                 "+detectors.mahalanobis_tuned._target_=ood_lightning.detectors.MahalanobisTuned"]
    auroc_heatmap([_row(" ".join(overrides), overrides, "msp", "noise", 0.9, 0.0, 1)], tmp_path / "h.png")
    (fig,) = drawn
    assert "MahalanobisTuned" in fig.get_supxlabel().replace("\n", "")
    assert_nothing_cut_off(fig)


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
    np.testing.assert_allclose(line.get_ydata(), [85, 65, 50])  # seed means by hand, ×100
    xs, lo, hi = _band(auroc)
    sd = 100 * np.std([0.9, 0.8], ddof=1)  # both two-seed points have this spread; one seed: none
    np.testing.assert_allclose(xs, [1e-3, 1e-2, 1e-1])
    np.testing.assert_allclose(lo, [85 - sd, 65 - sd, 50])
    np.testing.assert_allclose(hi, [85 + sd, 65 + sd, 50])
    assert any(ln.get_ydata()[0] == 50 and ln.get_linestyle() == ":" for ln in auroc.lines)  # chance
    (legend,) = fig.legends  # one legend, beside the panels
    assert [t.get_text() for t in legend.get_texts()] == ["dhm: svhn"]  # no threshold asked for
    assert_legend_covers_no_axes(fig, legend)
    assert_nothing_cut_off(fig)


def test_the_papers_collapse_band_is_drawn_only_over_runs_of_the_papers_setting():
    from ood_lightning.evaluation.sweep_plots import COLLAPSE_THRESHOLD, collapse_threshold, lambda_figure

    tiny = [{**r, "data": "stripes", "backbone": "cnn"} for r in SWEEP]
    paper = [{**r, "data": "cifar10", "backbone": "wrn28_10"} for r in SWEEP]
    assert collapse_threshold(tiny) is None and collapse_threshold(SWEEP) is None  # unrecorded: not the paper's
    assert collapse_threshold(paper) == COLLAPSE_THRESHOLD
    assert collapse_threshold(paper + tiny[:1]) is None
    fig = lambda_figure(paper, threshold=collapse_threshold(paper))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["dhm: svhn", "paper's collapse threshold"]
    for ax in fig.axes:
        (band,) = ax.patches  # axvspan: a rectangle in data x
        np.testing.assert_allclose([band.get_x(), band.get_x() + band.get_width()], COLLAPSE_THRESHOLD)
    assert not any(ax.patches for ax in lambda_figure(tiny, threshold=collapse_threshold(tiny)).axes)


def test_spectral_figure_panels_and_bands():
    from ood_lightning.evaluation.sweep_plots import spectral_figure

    records = [{**r, "x": c} for r, c in zip(SWEEP[:4], [1.0, 1.0, 3.0, 3.0])]
    fig = spectral_figure(records)
    acc, auroc, aupr = fig.axes
    assert [ax.get_xscale() for ax in fig.axes] == ["linear"] * 3
    assert all(ax.get_xlabel().startswith("spectral coefficient c") for ax in fig.axes)
    assert auroc.get_ylabel().startswith("AUROC") and aupr.get_ylabel().startswith("AUPR-in")
    xs, lo, hi = _band(aupr)
    sd = 100 * np.std([0.85, 0.75], ddof=1)  # ×100, like every table
    np.testing.assert_allclose(lo, [80 - sd, 60 - sd])
    np.testing.assert_allclose(hi, [80 + sd, 60 + sd])
    assert_nothing_cut_off(fig)


def test_every_figure_shares_one_style_and_leaves_the_global_style_alone(tmp_path, drawn):
    """The ROC panels, the heatmap and the sweep figures: same label and title sizes, grid, palette."""
    import matplotlib.pyplot as plt

    from ood_lightning.evaluation import style
    from ood_lightning.evaluation.sweep_plots import lambda_figure

    before = dict(plt.rcParams)
    rng = np.random.default_rng(0)
    roc_curves({"msp": {"id_test": rng.normal(1, 1, 50), "noise": rng.normal(0, 1, 50)}}, tmp_path / "roc.png")
    auroc_heatmap([_row("-", [], "msp", "noise", 0.9, 0.0, 1)], tmp_path / "h.png")
    roc, heat = drawn[0].axes[0], drawn[1].axes[0]
    sweep = lambda_figure(SWEEP).axes[2]
    for ax in (roc, heat, sweep):
        assert ax.yaxis.label.get_fontsize() == style.RC["axes.labelsize"]
        assert ax.xaxis.get_ticklabels()[0].get_fontsize() == style.RC["xtick.labelsize"]
    assert roc.title.get_fontsize() == heat.title.get_fontsize() == style.RC["axes.titlesize"]
    assert roc.xaxis.get_gridlines()[0].get_visible() and sweep.xaxis.get_gridlines()[0].get_visible()
    assert roc.lines[0].get_color() == sweep.lines[0].get_color() == style.PALETTE[0]  # the first curve
    assert dict(plt.rcParams) == before
