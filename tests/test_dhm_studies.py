"""The DHM studies (sweeps/): grid volume, the Prewitt backbone, sensitivity slopes,
the λ / spectral-coefficient sweep figures and the Table-1 view, and the 2-D / stripes /
sensitivity scripts end to end at a micro scale."""

from __future__ import annotations

import csv
import importlib
import json
import logging
import math
import sys

import numpy as np
import pytest
import torch
import yaml
from torch.distributions import MultivariateNormal

from ood_lightning.core.errors import ConfigError
from ood_lightning.data.synthetic import diagonal_stripes, stripes
from ood_lightning.evaluation.aggregate import aggregate, collect
from ood_lightning.evaluation.sweep_plots import (
    collect_sweep,
    last_epoch_values,
    plot_lambda,
    plot_spectral_coeff,
    run_value,
    side_by_side,
    summarise,
)
from ood_lightning.methods.dhm.sensitivity import fit_line, sensitivity
from ood_lightning.methods.dhm.volume import evaluate_on_grid, grid_volume, trapezoid_log_volume
from ood_lightning.nn.backbones.prewitt import PREWITT_HORIZONTAL, PrewittNet
from tests.conftest import ROOT, compose_cfg, sklearn_auroc

torch.set_num_threads(1)


# -- volume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cov", [[[1.0, 0.0], [0.0, 1.0]], [[2.0, 1.2], [1.2, 1.0]]])
def test_grid_volume_of_a_gaussian_is_one(cov):
    dist = MultivariateNormal(torch.tensor([0.3, -0.2]), torch.tensor(cov))
    assert grid_volume(dist.log_prob, (-9, 9), (-9, 9), 241) == pytest.approx(1.0, abs=1e-4)


def test_grid_volume_of_a_scaled_gaussian_and_of_a_quadrant_is_the_known_mass():
    dist = MultivariateNormal(torch.zeros(2), torch.eye(2))
    assert grid_volume(lambda x: dist.log_prob(x) + math.log(3.0), (-9, 9), (-9, 9), 241) == pytest.approx(3.0, rel=1e-4)
    # one quadrant of a standard normal holds a quarter of the mass
    assert grid_volume(dist.log_prob, (0, 9), (0, 9), 301) == pytest.approx(0.25, rel=1e-3)


def test_volume_is_computed_in_log_space_without_overflow():
    dist = MultivariateNormal(torch.zeros(2), torch.eye(2))
    g = evaluate_on_grid(lambda x: dist.log_prob(x) + 1000.0, (-9, 9), (-9, 9), 121)
    assert g.log_volume == pytest.approx(1000.0, abs=1e-4) and g.volume == math.inf
    assert g.log_density.shape == (121, 121)
    # the grid is row-major in y: log_density[i, j] is at (xs[j], ys[i])
    xs, ys = np.linspace(0, 1, 5), np.linspace(0, 2, 3)
    assert trapezoid_log_volume(np.zeros((3, 5)), xs, ys) == pytest.approx(math.log(2.0))


# -- Prewitt backbone ----------------------------------------------------------------------------
def test_prewitt_init_and_features_separate_stripe_directions():
    net = PrewittNet(in_channels=1, init="prewitt")
    torch.testing.assert_close(net.conv.weight[0, 0], PREWITT_HORIZONTAL)
    torch.testing.assert_close(net.conv.weight[1, 0], PREWITT_HORIZONTAL.t())
    assert net.conv.weight.requires_grad and net.feature_dim == 2
    x, y = stripes(400, seed=123)  # fresh data, not the training split
    with torch.no_grad():
        feats = net.forward_features(x)
    assert set(feats) == {"conv", "penultimate"} and feats["penultimate"].shape == (400, 2)
    h = feats["penultimate"]
    assert (h[y == 0, 0] > h[y == 0, 1]).all() and (h[y == 1, 1] > h[y == 1, 0]).all()
    # unpadded filters: an axis-aligned image gives 0 (up to rounding) in the other direction
    assert h[y == 0, 1].max() < 1e-6 and h[y == 1, 0].max() < 1e-6
    # diagonal stripes excite both filters
    d, _ = diagonal_stripes(200, seed=5, max_deviation=15)
    with torch.no_grad():
        hd = net(d)
    assert (hd.min(1).values > 0).float().mean() > 0.95


def test_prewitt_backbone_from_config_with_spectral_bound(tmp_path):
    cfg = compose_cfg("train", ["experiment=dhm_stripes", "method.flow.n_blocks=2", "backbone.init=prewitt"], tmp_path)
    from ood_lightning.run.build import build_model

    model = build_model(cfg, num_classes=2)
    assert type(model.backbone).__name__ == "PrewittNet" and model.flow.dim == 2
    assert model.feature_norm == "none" and len(model.flow.blocks) == 2
    with torch.no_grad():
        model.backbone.train()(torch.rand(4, 1, 9, 9))  # records the conv's input shape
    from ood_lightning.nn.spectral import spectral_norms

    assert max(spectral_norms(model.backbone).values()) <= 0.9 * 1.02
    # the raw (unbounded) weight is still the Prewitt pair
    raw = model.backbone.conv.parametrizations.weight.original
    torch.testing.assert_close(raw[0, 0], PREWITT_HORIZONTAL)


# -- sensitivity ---------------------------------------------------------------------------------
def test_sensitivity_of_a_scaled_isometry_is_exact():
    x = torch.randn(64, 3, 4, 4)
    q, _ = torch.linalg.qr(torch.randn(48, 48))
    for s in (0.5, 4.0):
        rows = sensitivity(lambda t, s=s: s * t.flatten(1) @ q.T, x, max_norm=2.0, n_norms=9)
        assert rows["none"].slope == pytest.approx(s, rel=1e-4)
        assert rows["none"].intercept == pytest.approx(0.0, abs=1e-4)
        assert rows["none"].pearson_r == pytest.approx(1.0, abs=1e-6)
        assert rows["none"].n_pairs == 64 * 9
    # normalised features do not see the scale s
    a = sensitivity(lambda t: t.flatten(1), x, max_norm=2.0, n_norms=9)
    b = sensitivity(lambda t: 7.0 * t.flatten(1), x, max_norm=2.0, n_norms=9)
    for k in ("l1", "l2", "linf"):
        assert a[k].slope == pytest.approx(b[k].slope, rel=1e-4)
        assert a[k].pearson_r == pytest.approx(b[k].pearson_r, abs=1e-5)
    assert a["l2"].mean_feature_norm == pytest.approx(1.0)


def test_fit_line_is_least_squares():
    eps = np.array([0.0, 1.0, 2.0, 3.0])
    dev = np.array([1.0, 3.0, 5.0, 7.5])
    slope, intercept, r = fit_line(eps, dev)
    ref = np.linalg.lstsq(np.c_[eps, np.ones(4)], dev, rcond=None)[0]
    assert (slope, intercept) == pytest.approx(tuple(ref))
    assert r == pytest.approx(np.corrcoef(eps, dev)[0, 1])


# -- sweep figures and Table 1 ------------------------------------------------------------------
def _fake_run(path, overrides, seed, auroc, val_acc, val_loss, config=None, msp=0.8):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or {"lambda": 0.0, "seed": seed}))
    (path / "csv").mkdir()
    rows = [{"epoch": 0, "step": 9, "val/acc": 0.1, "val/loss": 9.0, "train/loss": ""},
            {"epoch": 0, "step": 9, "val/acc": "", "val/loss": "", "train/loss": 2.0},
            {"epoch": 1, "step": 19, "val/acc": val_acc, "val/loss": val_loss, "train/loss": ""},
            {"epoch": 1, "step": 19, "val/acc": "", "val/loss": "", "train/loss": 1.0}]
    with (path / "csv" / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    res = {"dhm": {"svhn": {"auroc": auroc, "aupr_in": auroc - 0.05, "autc": 0.3}},
           "msp": {"svhn": {"auroc": msp, "aupr_in": msp - 0.05, "autc": 0.35}}}
    (path / "metrics.json").write_text(json.dumps({"seed": seed, "lambda": None, "accuracy": 0.9, "results": res}))


def test_lambda_plot_reads_x_from_overrides_and_val_from_the_last_epoch(tmp_path):
    _fake_run(tmp_path / "0", ["lambda=1e-3", "seed=0"], 0, 0.90, 0.95, 0.20)
    _fake_run(tmp_path / "1", ["lambda=1e-3", "seed=1"], 1, 0.80, 0.93, 0.30)
    _fake_run(tmp_path / "2", ["lambda=0.01", "seed=0"], 0, 0.50, 0.90, 1.50)
    (tmp_path / "3" / ".hydra").mkdir(parents=True)  # a run that failed: no metrics.json
    (tmp_path / "3" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["lambda=5e-3"]))
    assert run_value(tmp_path / "0", "lambda") == pytest.approx(1e-3)  # "1e-3": a string to YAML 1.1
    assert last_epoch_values(tmp_path / "0" / "csv" / "metrics.csv") == {"val/acc": 0.95, "val/loss": 0.20}
    records = collect_sweep(tmp_path, "lambda")
    assert sorted(r["x"] for r in records) == [1e-3, 1e-3, 1e-2]
    xs, mean, std, n = summarise(records, lambda r: r["results"]["dhm"]["svhn"]["auroc"])
    np.testing.assert_allclose(xs, [1e-3, 1e-2])
    np.testing.assert_allclose(mean, [0.85, 0.50])
    np.testing.assert_allclose(std, [np.std([0.9, 0.8], ddof=1), 0.0])
    assert list(n) == [2, 1]
    out = plot_lambda(tmp_path)
    assert out == tmp_path / "sweep_lambda.png" and out.stat().st_size > 10_000
    table = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [float(r["lambda"]) for r in table] == [1e-3, 1e-2]
    assert float(table[0]["val_loss_mean"]) == pytest.approx(0.25)
    assert float(table[0]["dhm/svhn/auroc_mean"]) == pytest.approx(0.85)


def test_evaluate_lists_the_sweep_figure_as_an_artifact_and_logs_it(tmp_path, monkeypatch):
    import evaluate
    from ood_lightning.run import loggers

    for i, lam in enumerate(["1e-3", "1e-2"]):
        _fake_run(tmp_path / "sweep" / str(i), [f"lambda={lam}", "seed=0"], 0, 0.9 - 0.2 * i, 0.9, 0.3)
    logged = []
    monkeypatch.setattr(loggers, "log_image", lambda logger, key, path, step: logged.append((type(logger).__name__, key)))
    sweep = tmp_path / "sweep"
    evaluate.evaluate(compose_cfg("evaluate", [f"run_dir={sweep}", "plot=lambda", "logger=csv"], tmp_path / "e"))
    assert json.loads((sweep / "summary.json").read_text()) == {"artifacts": ["summary_auroc.png", "sweep_lambda.png"]}
    assert sorted(logged) == [("CSVLogger", "summary/summary_auroc"), ("CSVLogger", "summary/sweep_lambda")]  # every logger gets them


def test_spectral_plot_falls_back_to_the_resolved_config(tmp_path):
    for i, c in enumerate([1.0, 6.0]):  # c set by a preset: not in the overrides
        _fake_run(tmp_path / str(i), ["experiment=dhm_cifar10"], 0, 0.9 - 0.1 * i, 0.9, 0.3,
                  config={"method": {"spectral_coeff": c}, "lambda": 3.5e-3})
    assert run_value(tmp_path / "1", "method.spectral_coeff") == 6.0
    assert run_value(tmp_path / "1", "lambda") == 3.5e-3
    out = plot_spectral_coeff(tmp_path, detectors=["dhm", "msp"])
    assert out.name == "sweep_spectral_coeff.png" and out.stat().st_size > 10_000


def test_table_one_puts_detectors_side_by_side_and_evaluate_writes_it(tmp_path, caplog):
    for seed, (a, m) in enumerate([(0.90, 0.85), (0.88, 0.87)]):
        _fake_run(tmp_path / str(seed), [f"seed={seed}"], seed, a, 0.9, 0.3, msp=m)
    runs, _ = collect(tmp_path)
    text = side_by_side(aggregate(runs), ["dhm", "msp"])
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    # ×100 like summary.md; AUROC std of (0.90, 0.88) = 1.41 points, AuTC 0.3 in both seeds
    assert lines[0] == "| OOD set | dhm auroc | dhm aupr_in | dhm autc | msp auroc | msp aupr_in | msp autc |"
    assert lines[1] == "| svhn | 89.0 ± 1.4 | 84.0 ± 1.4 | 30.0 ± 0.0 | 86.0 ± 1.4 | 81.0 ± 1.4 | 35.0 ± 0.0 |"
    assert "**every run** (2 seeds, test accuracy 90.0 ± 0.0)" in text
    with caplog.at_level(logging.WARNING):  # a typo'd detector is left out, loudly
        assert "| OOD set | dhm auroc | dhm aupr_in | dhm autc |\n" in side_by_side(aggregate(runs), ["dhm", "mps"])
    assert "['mps'] not in the runs" in caplog.text and "'msp'" in caplog.text
    from evaluate import evaluate

    cfg = compose_cfg("evaluate", [f"run_dir={tmp_path}", "plot=lambda", "compare=[dhm,msp]"], tmp_path / "eval")
    with pytest.raises(ConfigError, match=r"no finished runs with lambda > 0 under .* \(log-scale x axis\)"):
        evaluate(cfg)  # these runs have no λ: a clear error
    cfg = compose_cfg("evaluate", [f"run_dir={tmp_path}", "compare=[dhm,msp]"], tmp_path / "eval")
    evaluate(cfg)
    assert "| svhn | 89.0 ± 1.4 |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "summary.md").exists()


def test_prewitt_backbone_random_init_is_seeded_and_not_prewitt():
    """init=random (the authors' default): torch's conv init, reproducible under the seed."""
    torch.manual_seed(0)
    a = PrewittNet(in_channels=1).conv.weight.detach().clone()
    torch.manual_seed(0)
    b = PrewittNet(in_channels=1, init="random").conv.weight.detach()
    torch.testing.assert_close(a, b)
    # neither filter is (a multiple of) a Prewitt filter
    for k in a[:, 0]:
        for ref in (PREWITT_HORIZONTAL, PREWITT_HORIZONTAL.t()):
            cos = float((k * ref).sum() / (k.norm() * ref.norm()))
            assert abs(cos) < 0.99
    with pytest.raises(ConfigError, match="backbone.init must be 'random' or 'prewitt'"):
        PrewittNet(init="sobel")


# -- the presets against the paper (§4.3, §4.4) and the authors' code ------------------------------
def test_stripes_preset_is_the_papers_recipe(tmp_path):
    """§4.3 and the authors' train_stripes_dhm.py: random init, softmax of the features as the
    classifier, plain SGD lr 0.01 (no momentum / weight decay / schedule), OOD at 15-75 degrees,
    a 50-block flow of hidden width 32 and Lipschitz coefficient 0.98."""
    cfg = compose_cfg("train", ["experiment=dhm_stripes"], tmp_path)
    assert cfg.backbone.init == "random" and cfg.backbone.trainable is True
    assert cfg.method.head == "softmax" and cfg.method.feature_norm == "none" and cfg.method.spectral_coeff == 0.9
    assert cfg.ood.diagonal.max_deviation == 30
    assert cfg.method.scheduler is None
    # the authors' StripesDHM flow: create_flow_model(2, dims='32', n_blocks=50, coeff=0.98), 5 power iterations
    f = cfg.method.flow
    assert (f.n_blocks, f.hidden, f.n_hidden_layers, f.activation_first, f.coeff, f.n_power_iterations) == (
        50, 32, 1, True, 0.98, 5)
    cfg = compose_cfg("train", ["experiment=dhm_stripes", "method.flow.n_blocks=2"], tmp_path)  # a quick build
    from ood_lightning.run.build import build_model

    torch.manual_seed(0)
    model = build_model(cfg, num_classes=2)
    opts, scheds = model.configure_optimizers()
    sgd = opts[0]
    assert type(sgd) is torch.optim.SGD and scheds == []
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.01, 0.0, False, 0.0)
    # softmax of the features: the logits are the 2-D features themselves, nothing to train in the head
    x = torch.rand(16, 1, 9, 9)
    model.eval()
    with torch.no_grad():
        h = model.backbone(x)
        torch.testing.assert_close(model(x), h)
    assert not any(p.requires_grad for p in model.head.parameters())
    # one plain-SGD step on a hand-made loss moves the conv weight by exactly -lr * grad
    model.train()
    w0 = model.backbone.conv.parametrizations.weight.original.detach().clone()
    sgd.zero_grad()
    model.backbone(x).sum().backward()
    grad = model.backbone.conv.parametrizations.weight.original.grad.clone()
    sgd.step()
    torch.testing.assert_close(model.backbone.conv.parametrizations.weight.original.detach(), w0 - 0.01 * grad)
    # the raw conv weight is not the Prewitt pair
    assert not torch.allclose(w0[0, 0], PREWITT_HORIZONTAL)
    # the built flow's Linears are bounded at 0.98: raw weights grown far above it come out at exactly 0.98
    from ood_lightning.nn.spectral import converge_spectral_norms

    linears = [m for m in model.flow.blocks[0].g if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for m in linears:
            m.parametrizations.weight.original.mul_(50)
    converge_spectral_norms(model.flow)
    norms = [torch.linalg.matrix_norm(m.weight.detach().double(), ord=2).item() for m in linears]
    assert norms == pytest.approx([0.98, 0.98], rel=1e-4)


def test_softmax_head_needs_one_feature_per_class(tmp_path):
    cfg = compose_cfg("train", ["experiment=dhm_stripes", "method.flow.n_blocks=2"], tmp_path)
    from ood_lightning.run.build import build_model

    # hydra wraps the ConfigError; the entrypoints print its one line
    with pytest.raises(Exception, match="method.head=softmax needs feature_dim == num_classes, got 2 features for 3"):
        build_model(cfg, num_classes=3)


def test_2d_preset_is_the_papers_setup(tmp_path, sweeps_module):
    """§4.4: 5 rings (chance 0.2), default c = 0.9, 2-D features (not 128-d l-inf-normalised),
    and a c grid holding the two values the paper reports (0.2 and 0.9)."""
    cfg = compose_cfg("train", ["experiment=dhm_2d", "data=rings", "method.flow.n_blocks=1"], tmp_path)
    assert cfg.method.spectral_coeff == 0.9 and cfg.method.feature_norm == "none"
    assert cfg.data.kwargs.num_rings == 5 and cfg.backbone.out_features == 2
    from ood_lightning.data.synthetic import rings
    from ood_lightning.run.build import build_model

    model = build_model(cfg, num_classes=5)
    assert model.backbone.feature_dim == 2 and model.flow.dim == 2
    with torch.no_grad():
        assert model.backbone(torch.randn(7, 2)).shape == (7, 2)
    _, y = rings(1000, seed=0, **cfg.data.kwargs)
    freq = torch.bincount(y, minlength=5).double() / len(y)
    assert len(freq) == 5 and float(freq.max()) == pytest.approx(0.2, abs=1e-3)  # chance = 0.2
    study = sweeps_module("dhm_2d")
    for grid in (study.COEFFS, study.CPU_COEFFS):
        assert 0.2 in grid and 0.9 in grid
    # the rings' integration window holds every ring (radii 1..5)
    (x0, x1), (y0, y1) = study.LIMITS["rings"]
    assert min(-x0, x1, -y0, y1) > 5.5


def test_dhm_cifar_preset_uses_the_authors_wrn_dropout_and_reflect_padding(tmp_path):
    cfg = compose_cfg("train", ["experiment=dhm_cifar10"], tmp_path)
    assert cfg.backbone.dropout == 0.3
    assert cfg.data.augment.crop_padding == 4 and cfg.data.augment.crop_padding_mode == "reflect"
    assert compose_cfg("train", ["data=cifar10"], tmp_path).data.augment.crop_padding_mode == "zeros"


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_random_crop_is_a_window_of_the_numpy_padded_image(mode):
    """Every crop equals one window of np.pad(mode=reflect / constant 0), an independent padding."""
    from ood_lightning.data.transforms import Preprocess, random_crop

    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5)
    p = 2
    ref = np.pad(x.numpy(), ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect" if mode == "reflect" else "constant")
    windows = {(i, dy, dx): ref[i, :, dy:dy + 5, dx:dx + 5] for i in range(2) for dy in range(2 * p + 1)
               for dx in range(2 * p + 1)}
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        out = random_crop(x, p, generator=gen, mode=mode)
        assert out.dtype == torch.uint8 and out.shape == x.shape
        for i in range(2):
            hits = [k for k, w in windows.items() if k[0] == i and np.array_equal(w, out[i].numpy())]
            assert hits, (mode, i)
            seen.update(hits)
    assert len(seen) > 30  # offsets vary
    with pytest.raises(ConfigError, match="crop_padding_mode must be one of"):
        Preprocess(crop_padding=4, crop_padding_mode="circular")
    with pytest.raises(ConfigError, match="reflect padding 5 needs images larger"):
        random_crop(x, 5, mode="reflect")


# -- the study scripts at a micro scale ----------------------------------------------------------
@pytest.fixture(scope="module")
def sweeps_module():
    sys.path.insert(0, str(ROOT / "sweeps"))
    yield lambda name: importlib.import_module(name)
    sys.path.remove(str(ROOT / "sweeps"))


MICRO = ["debug=fast", "~callbacks.progress_bar", "trainer.limit_val_batches=1", "method.monitor_ood.limit=64"]


def test_stripes_script_trains_plots_and_feeds_the_sensitivity_table(sweeps_module, tmp_path):
    study = sweeps_module("dhm_stripes")
    rec = study.run_one(1e-3, epochs=1, grid=25, out=tmp_path, extra=[*MICRO, "method.flow.n_blocks=2", "data.n_test=200",
                                                                      "ood.diagonal.n=200"])
    assert rec["lambda"] == 1e-3 and np.isfinite(rec["train_logdet"])
    run = tmp_path / "lambda1e-03"
    assert rec["run"] == str(run)
    # the record's numbers against scikit-learn on the run's saved scores (ID = the positive class)
    scores = np.load(run / "scores.npz")
    for det in ("dhm", "msp"):
        id_s, ood_s = scores[f"{det}/id_test"], scores[f"{det}/diagonal"]
        assert len(ood_s) == 200
        truth = sklearn_auroc(id_s, ood_s)
        assert rec[f"auroc_{det}"] == pytest.approx(truth, abs=1e-12), det
    assert rec["accuracy"] == pytest.approx(float(np.mean(scores["preds/id_test"] == scores["labels/id_test"])))
    g = np.load(run / "feature_density.npz")
    assert g["log_density"].shape == (25, 25) and np.isfinite(g["log_density"]).all()
    # the volume is the trapezoid integral of the saved grid (rows are y, columns x)
    volume = np.trapezoid(np.trapezoid(np.exp(g["log_density"]), g["xs"], axis=1), g["ys"])
    assert rec["feature_plane_volume"] == pytest.approx(volume, rel=1e-9)
    assert g["horizontal"].shape[1] == 2 and len(g["diagonal"]) == 200
    assert study.plot_fig8([rec], tmp_path / "fig8.png").stat().st_size > 10_000
    text, result = sweeps_module("dhm_sensitivity").run(run / "checkpoints" / "last.ckpt",
                                                        n=32, max_norm=None, levels=5, seed=0, device="cpu")
    assert set(result["rows"]) == {"none", "l1", "l2", "linf"} and "| linf |" in text
    assert all(np.isfinite(r["slope"]) for r in result["rows"].values())


def test_2d_script_measures_accuracy_and_volume(sweeps_module, tmp_path):
    study = sweeps_module("dhm_2d")
    rec = study.run_one("moons", 2.0, seed=0, epochs=1, grid=8, out=tmp_path,
                        extra=[*MICRO, "method.flow.hidden=16", "backbone.hidden=16", "data.n_test=100"])
    assert rec["c"] == 2.0 and np.isfinite(rec["log_volume"])
    run = tmp_path / "moons" / "c2" / "seed0"
    scores = np.load(run / "scores.npz")
    assert len(scores["labels/id_test"]) == 100
    assert rec["accuracy"] == pytest.approx(float(np.mean(scores["preds/id_test"] == scores["labels/id_test"])))
    g = np.load(run / "grid_density.npz")  # rows are y, columns x
    volume = np.trapezoid(np.trapezoid(np.exp(g["log_density"]), g["xs"], axis=1), g["ys"])
    assert rec["log_volume"] == pytest.approx(math.log(volume), abs=1e-9)
    assert rec["max_log_density"] == pytest.approx(float(g["log_density"].max()))
    cfg = yaml.safe_load((tmp_path / "moons" / "c2" / "seed0" / ".hydra" / "config.yaml").read_text())
    assert cfg["method"]["spectral_coeff"] == 2.0 and cfg["method"]["flow"]["n_blocks"] == 5
    assert study.plot_fig10([rec], tmp_path / "fig10.png").stat().st_size > 10_000
    assert study.plot_fig9([rec], tmp_path / "fig9.png").stat().st_size > 10_000


def test_sweep_scripts_compose_their_experiments(tmp_path):
    tiny = compose_cfg("train", ["experiment=dhm_tiny", "lambda=3.67e-3", "method.spectral_coeff=6"], tmp_path)
    assert tiny.method.lambda_ == 3.67e-3 and tiny.method.spectral_coeff == 6 and tiny.data.name == "stripes"
    d2 = compose_cfg("train", ["experiment=dhm_2d", "data=rings"], tmp_path)
    assert d2.backbone.depth == 6 and d2.backbone.hidden == 128 and d2.method.flow.n_blocks == 5 and d2.method.flow.hidden == 128
    assert d2.data.name == "rings" and dict(d2.ood) == {}
    for script in ("dhm_lambda.sh", "dhm_spectral.sh", "dhm_seeds.sh"):
        text = (ROOT / "sweeps" / script).read_text()
        assert "train.py -m" in text and "evaluate.py" in text


def test_log_progress_shows_the_epoch_lines_outside_hydra(sweeps_module, monkeypatch):
    """A study script runs train() outside Hydra's job logging: without a handler the epoch
    progress lines (INFO on ``ood_lightning.core.progress``) vanish and a 160-epoch run is silent."""
    import io
    import logging

    common = sweeps_module("_common")
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    stream = io.StringIO()
    assert common.log_progress(stream) is True
    logging.getLogger("ood_lightning.core.progress").info("epoch 3/160: 9 steps in 2 s")
    assert "epoch 3/160: 9 steps in 2 s" in stream.getvalue()
    other = io.StringIO()  # already set up: left alone
    assert common.log_progress(other) is False and len(root.handlers) == 1


def test_stripes_script_resumes_by_lambda_and_epochs_and_plots_the_lambda_curve(sweeps_module, tmp_path, monkeypatch):
    study = sweeps_module("dhm_stripes")
    trained = []

    def fake_run(lam, epochs, grid, out, extra):
        trained.append((lam, epochs))
        return {"lambda": lam, "epochs": epochs, "accuracy": 0.9, "auroc_dhm": 0.9 if lam < 0.1 else 0.5,
                "auroc_msp": 0.6, "train_logdet": 1.0 if lam < 0.1 else 50.0, "feature_plane_volume": 1.0}

    monkeypatch.setattr(study, "run_one", fake_run)
    monkeypatch.setattr(study, "plot_fig8", lambda records, path: path)
    curves = []
    monkeypatch.setattr(study, "plot_lambda_curve", lambda records, path: curves.append(records) or path)

    def main(*args):
        monkeypatch.setattr(sys, "argv", ["dhm_stripes.py", "--out", str(tmp_path), *args])
        study.main()

    main("--lambdas", "1e-3", "1", "--epochs", "3")
    main("--lambdas", "1e-3", "0.1", "1", "--epochs", "3")  # only the new λ trains
    main("--lambdas", "1e-3", "--epochs", "4")  # other epochs: a new run
    assert trained == [(1e-3, 3), (1.0, 3), (0.1, 3), (1e-3, 4)]
    assert [r["lambda"] for r in curves[-1]] == [1e-3, 0.1, 1.0] and len(curves) == 2  # one λ: no curve
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sorted((r["lambda"], r["epochs"]) for r in saved) == sorted(trained)


def test_lambda_curve_figure_is_drawn(sweeps_module, tmp_path):
    study = sweeps_module("dhm_stripes")
    recs = [{"lambda": lam, "epochs": 160, "accuracy": 1.0, "auroc_dhm": a, "auroc_msp": 0.55, "train_logdet": ld}
            for lam, a, ld in ((1e-3, 0.99, 2.0), (1e-2, 0.97, 4.0), (1.0, 0.5, 300.0))]
    assert study.plot_lambda_curve(recs, tmp_path / "curve.png").stat().st_size > 10_000


def test_prewitt_alignment_is_one_for_the_solution_and_zero_across(sweeps_module):
    """Hand-computable: the Prewitt filters (any sign, scale or constant offset) align 1 with
    themselves and 0 with each other; a filter that answers no edge (a checkerboard) is 0 with both."""
    study = sweeps_module("dhm_stripes")
    from ood_lightning.nn.backbones.prewitt import PREWITT_VERTICAL

    w = torch.stack([-3.0 * PREWITT_HORIZONTAL + 0.7, 0.5 * PREWITT_VERTICAL]).unsqueeze(1)
    assert study.prewitt_alignment(w) == {"ch0_horizontal": 1.0, "ch0_vertical": 0.0,
                                          "ch1_horizontal": 0.0, "ch1_vertical": 1.0}
    checker = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])
    a = study.prewitt_alignment(torch.stack([checker, PREWITT_HORIZONTAL + PREWITT_VERTICAL]).unsqueeze(1))
    assert a["ch0_horizontal"] == a["ch0_vertical"] == 0.0
    assert a["ch1_horizontal"] == a["ch1_vertical"] == pytest.approx(2 ** -0.5, abs=1e-4)
