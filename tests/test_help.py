"""`--help` is the framework's own page: what it does, the quickstart, every paper preset with a line."""

from __future__ import annotations

import yaml

from tests.conftest import CONF, run_script


def _top_level_keys(entry: str) -> set[str]:
    doc = yaml.safe_load((CONF / f"{entry}.yaml").read_text())
    return {k for k in doc if k not in ("defaults", "task_name", "evaluation")} | {
        f"evaluation.{k}" for k in doc.get("evaluation", {})}


def test_train_help_names_every_preset_and_the_quickstart():
    res = run_script("train.py", "--help", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert out.startswith("ood-lightning: train, sweep and fairly compare") and "== Quickstart ==" in out
    assert "make demo" in out and "debug=fast" in out and "method/flow: glow, maf, realnvp, residual" in out
    presets = out.split("== Paper presets (experiment=...) ==")[1].split("== Configuration groups")[0]
    described = {line.split()[0] for line in presets.strip().splitlines()}
    assert described == {p.stem for p in (CONF / "experiment").glob("*.yaml")}  # a new preset needs its line
    missing = {k for k in _top_level_keys("train") if k not in out}
    assert not missing, missing  # a new top-level key needs its line
    for knob in ("data.limit_train", "data.limit_ood", "evaluation.fit_limit", "lambda="):
        assert knob in out
    groups = out.split("== Configuration groups")[1].split("\n", 1)[1].split("\n==")[0]
    assert "data: cifar10, cifar100, cifar10_jpeg, cifar6, fashionmnist, mnist, mnist6, moons, rings, stripes, svhn\n" in groups
    assert "schema" not in groups  # the data configs' schema is not a dataset


def test_evaluate_help_says_what_it_aggregates_and_rescores():
    res = run_script("evaluate.py", "--help", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "aggregate finished runs" in res.stdout and "ckpt_path=" in res.stdout and "paper=" in res.stdout
    groups = res.stdout.split("== Configuration groups")[1].split("\n", 1)[1].split("\n==")[0]
    listed = {line.split(":")[0] for line in groups.strip().splitlines()}
    assert listed == {"data", "ood", "detectors", "logger", "paths"}  # only what evaluate.py composes
    missing = {k for k in _top_level_keys("evaluate") if k not in res.stdout}
    assert not missing, missing
