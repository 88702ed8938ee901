"""`--help` is the framework's own page: what it does, the quickstart, every paper preset with a line."""

from __future__ import annotations

from tests.conftest import CONF, run_script


def test_train_help_names_every_preset_and_the_quickstart():
    res = run_script("train.py", "--help", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert out.startswith("ood-lightning: train, sweep and fairly compare") and "== Quickstart ==" in out
    assert "make demo" in out and "debug=fast" in out and "method/flow: glow, maf, realnvp, residual" in out
    presets = out.split("== Paper presets (experiment=...) ==")[1].split("== Configuration groups")[0]
    described = {line.split()[0] for line in presets.strip().splitlines()}
    assert described == {p.stem for p in (CONF / "experiment").glob("*.yaml")}  # a new preset needs its line


def test_evaluate_help_says_what_it_aggregates_and_rescores():
    res = run_script("evaluate.py", "--help", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "aggregate finished runs" in res.stdout and "ckpt_path=" in res.stdout and "paper=" in res.stdout
