"""The LDE table drivers (sweeps/lde_tables.py) on tiny synthetic features
whose answer is known: an OOD signal that lives only in the top principal components survives
a small ``pca_dim``, one that lives only in the bottom ones does not."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from ood_lightning.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
#: a tiny Glow and a short, fast fit (the driver's own settings would take 10 blocks of 4·d)
TINY = {"glow": {"name": "glow", "n_blocks": 2, "hidden": 16}, "realnvp": {"name": "realnvp", "n_blocks": 2, "hidden": 16}}
FIT = {"epsilon": 1 / 1024, "lr": 1e-2, "epochs": 8, "batch_size": 128, "seed": 0}


@pytest.fixture(scope="module")
def T():
    sys.path.insert(0, str(ROOT / "sweeps"))
    try:
        yield importlib.import_module("lde_tables")
    finally:
        sys.path.remove(str(ROOT / "sweeps"))


def toy(n: int = 1500, dim: int = 12, seed: int = 0):
    """ID: 2 high-variance directions (σ = 4) + 10 low ones (σ = 0.3), randomly rotated.
    ``top``: shifted by a Mahalanobis distance of 6 along the high-variance pair only; ``low``: by 6 in the low ones only."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([4.0, 4.0] + [0.3] * (dim - 2))
    rot, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))

    def draw(shift):
        return ((torch.randn(n, dim, generator=g) * scale + shift) @ rot.T)

    top = torch.zeros(dim)
    top[:2] = 6 * 4.0 / 2 ** 0.5
    low = torch.zeros(dim)
    low[2:] = 6 * 0.3 / (dim - 2) ** 0.5
    return draw(0), {"id_test": draw(0), "top": draw(top), "low": draw(low)}


def test_small_pca_keeps_a_top_component_signal_and_loses_a_bottom_one(T):
    train, sets = toy()
    configs = [T.Config("pca=2", "glow", "none", 2), T.Config("pca=none", "glow", "none", None)]
    small, full = T.run_table(configs, train, sets, FIT, presets=TINY)
    assert (small.dim, full.dim) == (2, 12)
    assert small.auroc["top"] > 0.95  # the signal is in the 2 kept components
    assert 0.4 < small.auroc["low"] < 0.6  # projected away: chance
    assert full.auroc["low"] > 0.95 and full.auroc["top"] > 0.95
    assert small.mean_auroc == pytest.approx((small.auroc["top"] + small.auroc["low"]) / 2)


def test_one_row_per_configuration_in_markdown_and_json(T, tmp_path):
    train, sets = toy(n=400, dim=6)
    configs = T.configurations("flows", flows=["glow", "realnvp"])
    assert [c.name for c in configs] == ["glow, l2", "glow, none", "realnvp, l2", "realnvp, none"]
    rows = T.run_table(configs, train, sets, {**FIT, "epochs": 1}, presets=TINY)
    steps = 400 // 128 + int(400 % 128 >= 2)  # 3 full batches + the remainder of 16
    assert {(r.fit_samples, r.fit_steps) for r in rows} == {(400, steps)}
    setting = {"backbone": "toy", "data": "toy", "fit_samples": 400, "fit_steps": steps, "fit_augmented": True,
               "feature_dim": 6, **FIT, "epochs": 1}
    md, js = T.write_outputs("flows", rows, setting, tmp_path)
    data = json.loads(js.read_text())
    assert [r["name"] for r in data["rows"]] == [c.name for c in configs]
    assert set(data["rows"][0]["auroc"]) == {"top", "low"} and set(data["rows"][0]["bpd"]) == set(sets)
    text = md.read_text()
    ours = [line for line in text.splitlines() if line.startswith(("| glow,", "| realnvp,"))
            and "paper" not in line and line.count("|") > 8]
    assert len(ours) == 4
    assert "400 augmented training latents, 4 steps" in text
    # the paper's Tables 3 and 5 beside ours: Table 5's Glow SVHN 96.99, Table 3's unnormalised 85.63
    assert "| glow, l2 | 5 | 96.99 | 85.87 |" in text and "| glow, none | 3 | 85.63 | 57.68 |" in text


def test_pca_table_writes_its_figure(T, tmp_path):
    train, sets = toy(n=300, dim=4)
    rows = T.run_table(T.configurations("pca", pca=[2, None]), train, sets, {**FIT, "epochs": 1}, presets=TINY)
    setting = {"fit_samples": 300, "fit_steps": 3, "feature_dim": 4, **FIT, "epochs": 1}
    paths = T.write_outputs("pca", rows, setting, tmp_path)
    assert [p.name for p in paths] == ["lde_pca.md", "lde_pca.json", "lde_pca.png"]
    assert paths[2].stat().st_size > 0 and "Fig. 3" in paths[0].read_text()


@pytest.mark.parametrize("argv, message", [
    (["--table", "pca", "--pca", "4,x"], "--pca: 'x' is not a positive number"),
    (["--table", "pca", "--pca", "0"], "--pca: '0' is not a positive number"),
    (["--table", "pca", "--pca", "4,4"], "--pca: 4 is listed twice"),
    (["--table", "flows", "--flows", "glow,nice"], "--flows: unknown flow 'nice'"),
    (["--table", "flows", "--score-limit", "1"], "--score-limit must be >= 2"),
    (["--table", "flows", "--flows", "glow,residual", "--flow-arg", "actnorm=true"],
     "--flow-arg: flow preset 'glow' has no argument 'actnorm'"),
    (["--table", "pca", "--flow-arg", "n_blocks"], "--flow-arg: expected KEY=VALUE"),
])
def test_bad_options_give_one_line(T, argv, message, capsys):
    assert T.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1


def test_more_components_than_features_is_one_clear_error(T):
    train, sets = toy(n=50, dim=4)
    with pytest.raises(ConfigError, match="8 components asked for, but the features have dimension 4"):
        T.run_table(T.configurations("pca", pca=[2, 8]), train, sets, FIT, presets=TINY)


def test_user_overrides_replace_the_defaults(T):
    out = T.merged_overrides(["backbone=cifar_resnet56_pretrained", "seed=1"])
    assert "backbone=cifar_resnet20_pretrained" not in out and out[-2:] == ["backbone=cifar_resnet56_pretrained",
                                                                           "seed=1"]
    assert "evaluation.fit_augmented=true" in out and "evaluation.fit_limit=null" in out


def test_score_subset_is_seeded_and_leaves_small_sets_whole(T):
    sets = {"a": torch.arange(10.0)[:, None], "b": torch.arange(3.0)[:, None]}
    one, two = T.subsample(sets, 4), T.subsample(sets, 4)
    assert one["a"].shape == (4, 1) and torch.equal(one["a"], two["a"]) and torch.equal(one["b"], sets["b"])
    assert len(set(one["a"].flatten().tolist())) == 4  # without replacement
    assert T.subsample(sets, None) is sets


def test_flow_arg_replaces_a_preset_argument(T):
    presets = T.flow_args(["actnorm=true", "n_blocks=3"], ["residual"])
    assert presets["residual"]["actnorm"] is True and presets["residual"]["n_blocks"] == 3
    assert presets["residual"]["hidden"] == T.flow_preset("residual")["hidden"]
