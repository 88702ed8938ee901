"""The results page (``evaluate.py run_dir=<run> report=<page>``): written from metrics.json alone,
it states the command, commit, machine and wall times, the setting, every table (group means
naming their sets) and the paper view; a real run records everything the page needs."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from tests.conftest import ROOT, TINY, compose_cfg

METRICS = {
    "method": "lsgm", "backbone": "cifar_resnet20_pretrained", "data": "cifar10", "seed": 0, "accuracy": 0.9173,
    "provenance": {"command": "python train.py experiment=posthoc_cifar10 backbone=cifar_resnet20_pretrained",
                   "commit": {"sha": "0123456789abcdef0123", "dirty": False},
                   "machine": {"cpu": "Xeon", "cores": 2, "torch_threads": 1, "gpu": None, "load_1min": 3.5},
                   "wall_s": 1234.5},
    "setting": {"id_data": {"name": "cifar10", "set": "cifar10", "encoding": "lossless", "known_classes": None},
                "splits": {"train": 45000, "val": 5000, "test": 10000}, "limits": {}, "debug": None,
                "ood": {"gaussian": {"dataset": "gaussian_noise", "group": "far", "n": 10000},
                        "tin_crop": {"dataset": "tinyimagenet_crop", "group": "far", "n": 10000}},
                "groups": {"far": ["gaussian", "tin_crop"]},
                "scorers": {"msp": {"fit": None},
                            "lde": {"fit": {"augmented": True, "samples": 45000}, "flow": "glow"},
                            "odin": {"fit": None, "input_perturbation": {"epsilon": 0.0025, "chosen": "on ID validation",
                                                                         "grid": [0.0025, 0.005]}}}},
    "timings_s": {"features/id_train": 100.0, "fit/lde": 42.25},
    "results": {"msp": {"gaussian": {"auroc": 0.9086, "fpr95": 0.5}, "tin_crop": {"auroc": 0.8, "fpr95": 0.6},
                        "mean_far": {"auroc": 0.8543, "fpr95": 0.55}},
                "lde": {"gaussian": {"auroc": 0.9941, "fpr95": 0.01}, "tin_crop": {"auroc": 0.7, "fpr95": 0.9},
                        "mean_far": {"auroc": 0.8471, "fpr95": 0.455}},
                "odin": {"gaussian": {"auroc": 0.8, "fpr95": 0.7}}},
}


def _page(tmp_path, metrics: dict, paper: str | None = "lde") -> str:
    import evaluate

    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    page = tmp_path / "docs" / "page.md"
    evaluate.evaluate(compose_cfg("evaluate", [f"run_dir={run}", f"report={page}",
                                               *([f"paper={paper}"] if paper else [])], tmp_path / "e"))
    return page.read_text()


def _row(text: str, first_cells: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if line.startswith(first_cells)]
    return [c.strip() for c in line.strip("|").split("|")]


def test_page_states_provenance_setting_tables_and_the_paper_view(tmp_path):
    text = _page(tmp_path, METRICS)
    assert f"Written by `python evaluate.py run_dir={tmp_path / 'run'} report={tmp_path / 'docs' / 'page.md'} " \
           "paper=lde`" in text
    assert "- command: `python train.py experiment=posthoc_cifar10 backbone=cifar_resnet20_pretrained`" in text
    assert "- commit: `0123456789ab`" in text and "load average 3.5" in text and "1,234 s" in text
    assert "- ID data: `cifar10` (lossless images of cifar10); train 45,000, val 5,000, test 10,000" in text
    assert "- `mean_far` = the mean over `gaussian`, `tin_crop`" in text
    assert "- fitted on augmented training inputs, 45,000 (the whole split): lde" in text
    assert "odin ε = 0.0025 (chosen on ID validation from [0.0025, 0.005]); none for the others" in text
    assert "cut-down" not in text.lower().split("## ours vs")[0]
    assert "ID test accuracy: **91.73%**" in text
    auroc = text.split("## AUROC ×100")[1].split("##")[0]
    assert _row(auroc, "| scorer |") == ["scorer", "gaussian", "tin_crop", "mean_far"]
    assert _row(auroc, "| lde |") == ["lde", "99.41", "70.00", "84.71"] and _row(auroc, "| odin |")[2:] == ["–", "–"]
    assert "## FPR@95%TPR ×100 (lower is better)" in text and "| fit/lde | 42.2 |" in text
    paper = text.split("## Ours vs the paper: lde")[1]
    lde = _row(paper, "| lde | 1 | lde (LDE (ours)) | gaussian | auroc |")
    assert lde[5:8] == ["99.41", "99.41", "+0.00"]
    assert lde[8] == "OOD ✓, ID ✓ lossless, backbone ✗ ResNet-20 vs ResNet-18, metric ✓, flow ✓, fit ✓ augmented 45,000"
    assert _row(paper, "| lde | 1 | odin (ODIN) | gaussian | auroc |")[7] == "**-8.95** ⚠"


def test_a_jpeg_smoke_run_is_flagged_and_another_id_set_left_out(tmp_path):
    m = json.loads(json.dumps(METRICS))
    m["setting"]["id_data"].update(name="cifar10_jpeg", encoding="JPEG copy (quality 75)")
    m["setting"].update(limits={"data.limit_test": 500}, debug="fast")
    text = _page(tmp_path, m)
    assert "- ⚠ **cut-down run, not a result**: data.limit_test=500; debug=fast; ID data is the JPEG copy (quality 75)" \
        in text
    assert "ID ✗ JPEG copy (quality 75) vs the published images" in text
    m = json.loads(json.dumps(METRICS))
    m["setting"]["id_data"].update(name="cifar100", set="cifar100")
    text = _page(tmp_path / "other", m)
    assert "| lde | 1 |" not in text and "Left out: the paper's rows on ID cifar10 (this run's ID set is cifar100)." in text


def test_report_needs_a_finished_run(tmp_path):
    import evaluate
    from ood_lightning.core.errors import ConfigError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no metrics.json in"):
        evaluate.evaluate(compose_cfg("evaluate", [f"run_dir={tmp_path / 'empty'}", "report=x.md"], tmp_path / "e"))
    with pytest.raises(ConfigError, match="pass run_dir="):
        evaluate.evaluate(compose_cfg("evaluate", ["report=x.md"], tmp_path / "e"))


def test_a_real_run_records_what_the_page_needs(tmp_path):
    """train.py on the tiny task: metrics.json holds the command, this checkout's commit, the machine,
    the setting (debug preset and limits, the fit split per scorer, ODIN's fixed ε) and the page
    reproduces its numbers."""
    from ood_lightning.run.runs import train

    metrics = train(compose_cfg("train", [*TINY, "detectors=fast"], tmp_path / "run"))
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    prov, setting = written["provenance"], written["setting"]
    assert prov["commit"]["sha"] == head and prov["command"].startswith("python ")
    assert prov["machine"]["cores"] >= 1 and prov["wall_s"] > 0 and "train" in written["timings_s"]
    assert setting["debug"] == "fast" and setting["limits"]["evaluation.fit_limit"] == 512
    assert setting["id_data"] == {"name": "stripes", "set": "stripes", "encoding": "lossless", "known_classes": None}
    assert setting["ood"]["diagonal"]["n"] == len(np.load(tmp_path / "run" / "scores.npz")["msp/diagonal"])
    from ood_lightning.evaluation.report import write_report

    text = write_report(tmp_path / "run", tmp_path / "page.md").read_text()
    auroc = text.split("## AUROC")[1].split("\n## ")[0]
    for det, rows in metrics["results"].items():
        assert _row(auroc, f"| {det} |")[1] == f"{100 * rows['diagonal']['auroc']:.2f}"
    assert "⚠ **cut-down run, not a result**" in text


def test_a_block_of_a_hand_written_page_is_filled_and_checked_against_a_run(tmp_path):
    """README's demo table: the block between the markers is written from the run; the check passes
    on the same numbers (whatever the commit, machine or wall time) and names the first difference."""
    from ood_lightning.core.errors import ConfigError
    from ood_lightning.evaluation.report import write_block

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(METRICS))
    page = tmp_path / "README.md"
    page.write_text("# Title\n\nprose before\n<!-- report:demo -->\nold\n<!-- /report:demo -->\nprose after\n")
    write_block(run, page, "demo")
    text = page.read_text()
    assert text.startswith("# Title\n\nprose before\n<!-- report:demo -->\nMeasured by `python train.py experiment=")
    assert text.endswith("<!-- /report:demo -->\nprose after\n") and "old" not in text
    assert "ID test accuracy 91.73%" in text and "| lde | 99.41 | 70.00 | 84.71 |" in text
    assert f"Written by `python evaluate.py run_dir={run} report={page} report_block=demo`" in text
    m = json.loads(json.dumps(METRICS))
    m["provenance"].update(commit={"sha": "fedcba9876543210", "dirty": True}, wall_s=99.0)  # another machine, same run
    (run / "metrics.json").write_text(json.dumps(m))
    write_block(run, page, "demo", check=True)
    assert page.read_text() == text  # a check writes nothing
    m["results"]["lde"]["tin_crop"]["auroc"] = 0.7001
    (run / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match=r"block 'demo' differs from the run .*'\| lde \| 99.41 \| 70.00 \| 84.71 \|' vs "
                                          r"'\| lde \| 99.41 \| 70.01 \| 84.71 \|'"):
        write_block(run, page, "demo", check=True)
    page.write_text("no markers\n")
    with pytest.raises(ConfigError, match="has no block 'demo': put the lines <!-- report:demo -->"):
        write_block(run, page, "demo")



DEMO_RUN = ROOT / "docs" / "results" / "demo"


@pytest.mark.skipif(not (DEMO_RUN / "metrics.json").is_file(),
                    reason=f"no recorded demo run at {DEMO_RUN} yet: `make demo-record` records it and fills README.md")
def test_the_readme_demo_table_is_the_recorded_demo_run():
    """README.md's demo block has exactly the numbers of docs/results/demo/metrics.json (`make demo-record`);
    `make demo-check` compares a fresh demo run the same way (the demo's minutes, so not in the suite)."""
    from ood_lightning.evaluation.report import write_block

    write_block(DEMO_RUN, ROOT / "README.md", "demo", check=True)
