"""The entrypoints end to end on CPU with tiny configs: the files a run writes, exact
reproducibility from a seed, multirun aggregation, re-scoring, and clear bad-input errors."""

from __future__ import annotations

import csv
import json
import logging
import re

import numpy as np
import pytest
import torch

from ood_lightning.core.errors import CheckpointMismatchError, ConfigError
from ood_lightning.run.runs import train
from tests.conftest import TINY, compose_cfg, needs_shared, run_script, sklearn_auroc

pytestmark = pytest.mark.slow
DETECTORS = {"msp", "odin", "energy", "react", "mahalanobis", "mahalanobis_ensemble", "knn", "vim", "maxlogit"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = compose_cfg("train", TINY, out)
    metrics = train(cfg)
    return out, metrics


def test_train_writes_metrics_scores_plot_checkpoint_and_logs(tiny_run):
    out, metrics = tiny_run
    written = json.loads((out / "metrics.json").read_text())
    assert set(written["results"]) == DETECTORS
    assert written["method"] == "classifier" and written["data"] == "stripes" and written["seed"] == 0
    for rows in written["results"].values():
        assert set(rows) == {"diagonal"}
        m = rows["diagonal"]
        assert set(m) >= {"auroc", "aupr_in", "aupr_out", "fpr95", "tnr95", "detection_error", "autc", "macro_f1"}
        assert all(np.isfinite(v) for v in m.values())
        assert m["tnr95"] == pytest.approx(1 - m["fpr95"])
    scores = np.load(out / "scores.npz")
    # metrics.json agrees with scikit-learn on the saved scores (ID positive)
    for det in DETECTORS:
        id_s, ood_s = scores[f"{det}/id_test"], scores[f"{det}/diagonal"]
        assert len(id_s) == len(ood_s) == 256  # debug=fast limits ID test and OOD sets to 256
        truth = sklearn_auroc(id_s, ood_s)
        assert written["results"][det]["diagonal"]["auroc"] == pytest.approx(truth)
    acc = (scores["preds/id_test"] == scores["labels/id_test"]).mean()
    assert written["accuracy"] == pytest.approx(acc)
    assert (out / "plots" / "scores.png").stat().st_size > 10_000
    assert (out / "checkpoints" / "last.ckpt").exists()
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    assert any(r.get("ood/msp/diagonal/auroc") for r in rows)
    assert any(r.get("train/loss") for r in rows)


def test_same_seed_reproduces_metrics_exactly(tiny_run, tmp_path):
    out, first = tiny_run
    second = train(compose_cfg("train", TINY, tmp_path))
    assert second["results"] == first["results"] and second["accuracy"] == first["accuracy"]
    other = train(compose_cfg("train", [*TINY, "seed=1"], tmp_path / "seed1"))
    assert other["results"] != first["results"]


def test_detectors_separate_an_easy_ood_set_after_training(tmp_path):
    """Stripes learnt for 2 epochs vs uniform noise in the same shape: every baseline > 0.9 AUROC."""
    no_debug = [o for o in TINY if o != "debug=fast"]
    cfg = compose_cfg("train", [*no_debug, "trainer.max_epochs=2", "data.n_train=2000",
                                "+ood.noise={dataset: uniform_noise, n: 300, seed: 5}"], tmp_path)
    metrics = train(cfg)
    assert metrics["accuracy"] > 0.95
    for det, rows in metrics["results"].items():
        assert rows["noise"]["auroc"] > 0.9, (det, rows["noise"])


def test_rescore_checkpoint_with_other_detectors(tiny_run, tmp_path):
    out, first = tiny_run
    from ood_lightning.run.runs import rescore

    cfg = compose_cfg("evaluate", [f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", "detectors=fast"], tmp_path)
    metrics = rescore(cfg)
    assert set(metrics["results"]) == {"msp", "energy", "mahalanobis"}
    for det in ("msp", "energy", "mahalanobis"):
        assert metrics["results"][det]["diagonal"]["auroc"] == pytest.approx(first["results"][det]["diagonal"]["auroc"])


def test_checkpoint_that_does_not_match_the_config_is_a_clear_error(tiny_run, tmp_path):
    out, _ = tiny_run
    cfg = compose_cfg("train", [*TINY, "backbone.widths=[8,32]", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"],
                      tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"does not match the configured model.*size mismatch"):
        train(cfg)


def test_nan_loss_stops_with_step_terms_and_checkpoint(tmp_path):
    cfg = compose_cfg("train", [*TINY, "method.optimizer.lr=1e30", "detectors=none"], tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 0, step \d+: ce=(nan|inf).*checkpoint saved to"):
        train(cfg)
    assert list((tmp_path / "checkpoints").glob("nonfinite-step*.ckpt"))


def test_deferred_nan_check_names_the_same_step_as_the_immediate_one(tmp_path):
    """nan_check_every=k (CUDA's default) reads the loss every k steps yet reports the first bad step."""
    found = {}
    for every in (1, 5):
        cfg = compose_cfg("train", [*TINY, "method.optimizer.lr=1e30", "detectors=none", f"nan_check_every={every}"],
                          tmp_path / str(every))
        with pytest.raises(FloatingPointError) as err:
            train(cfg)
        found[every] = re.search(r"non-finite loss at epoch (\d+), step (\d+): (ce=\S+)", str(err.value)).groups()
        assert list((tmp_path / str(every) / "checkpoints").glob(f"nonfinite-step{found[every][1]}.ckpt"))
    assert found[5] == found[1]
    # debug=fast: one epoch of 4 batches, so the window of steps 0-4 is read at the epoch's end (step 3)
    late = 3 - int(found[1][1])
    assert (f"found {late} steps later: nan_check_every=5" in str(err.value)) == (late > 0)


def test_run_without_ood_sets_or_detectors_reports_accuracy_only(tiny_run, tmp_path, capsys):
    tiny = [o for o in TINY if not o.startswith("ood")]
    cfg = compose_cfg("train", [*tiny, "ood=none", "detectors=none"], tmp_path)
    metrics = train(cfg)
    # the same seed and training data as the tiny run: the same model, whatever is scored after
    assert metrics["results"] == {} and metrics["accuracy"] == tiny_run[1]["accuracy"]
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    assert "no OOD scores" in capsys.readouterr().out


def test_vae_with_whole_split_bn_adaptation_rescores_with_the_default_detectors(tmp_path, caplog):
    """evaluate.py defaults to detectors=baselines: a VAE has no classifier, so they are skipped
    (not scored on zero logits); bn_stats=stream re-estimates BatchNorm before every pass, and
    the posterior samples are seeded per split, so re-scoring gives the training run's numbers."""
    vae = ["data=stripes", "ood=diagonal_stripes", "method=vae", "backbone=dcgan", "backbone.widths=[8,16]", "backbone.image_size=9",
           "method.latent_dim=4", "method.iwae_samples=[2]", "trainer=cpu", "debug=fast", "logger=csv",
           "data.n_train=600", "data.n_test=200", "data.val_size=100", "ood.diagonal.n=200",
           "method.adapt_bn=encoder", "method.bn_stats=stream"]
    first = train(compose_cfg("train", vae, tmp_path / "train"))
    from ood_lightning.run.runs import rescore

    caplog.set_level(logging.WARNING)
    cfg = compose_cfg("evaluate", [f"ckpt_path={tmp_path / 'train' / 'checkpoints' / 'last.ckpt'}"], tmp_path / "ev")
    again = rescore(cfg)
    assert "skipping detectors" in caplog.text and "msp" not in again["results"]
    assert set(again["results"]) == set(first["results"]) and "iwae_k2_bn_encoder" in again["results"]
    for name, per_set in first["results"].items():
        assert again["results"][name]["diagonal"]["auroc"] == pytest.approx(per_set["diagonal"]["auroc"], abs=1e-9)


def test_results_are_written_before_a_method_s_extra_outputs_can_fail(tiny_run, tmp_path, monkeypatch):
    from ood_lightning.methods.classifier import Classifier
    from ood_lightning.run.runs import rescore

    def broken_pictures(self, out_dir, results, dm, device):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(Classifier, "report", broken_pictures)
    ckpt = tiny_run[0] / "checkpoints" / "last.ckpt"
    runs = {"train": lambda out: train(compose_cfg("train", [*TINY, "detectors=fast"], out)),
            "rescore": lambda out: rescore(compose_cfg("evaluate", [f"ckpt_path={ckpt}", "detectors=fast"], out))}
    for name, run in runs.items():
        with pytest.raises(RuntimeError, match="plotting failed"):
            run(tmp_path / name)
        written = json.loads((tmp_path / name / "metrics.json").read_text())
        scores = np.load(tmp_path / name / "scores.npz")
        id_s, ood_s = scores["msp/id_test"], scores["msp/diagonal"]
        expected = sklearn_auroc(id_s, ood_s)
        assert written["results"]["msp"]["diagonal"]["auroc"] == pytest.approx(expected), name


def test_empty_class_selection_is_a_clear_error(tmp_path):
    # caught by the up-front check, before any data is read: the key and the valid range
    with pytest.raises(ConfigError, match=r"data.known_classes=\[5\].*\(0\.\.1\)"):
        train(compose_cfg("train", [*TINY, "data.known_classes=[5]"], tmp_path))


def test_cli_multirun_then_aggregate_mean_std(tmp_path):
    sweep = tmp_path / "sweep"
    res = run_script("train.py", "-m", *TINY, "detectors=fast", "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list(sweep.glob("*/metrics.json"))) == 2
    res = run_script("evaluate.py", f"run_dir={sweep}", f"hydra.run.dir={tmp_path / 'agg'}")
    assert res.returncode == 0, res.stderr[-3000:]
    text = (sweep / "summary.md").read_text()
    assert "±" in text and "| msp | diagonal | 2 |" in text
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    per_seed = [json.loads(p.read_text())["results"]["msp"]["diagonal"]["auroc"] for p in sorted(sweep.glob("*/metrics.json"))]
    msp = next(r for r in rows if r["detector"] == "msp" and r["ood_set"] == "diagonal")
    assert float(msp["auroc_mean"]) == pytest.approx(np.mean(per_seed))
    assert float(msp["auroc_std"]) == pytest.approx(np.std(per_seed, ddof=1))


def test_cli_bad_input_gives_one_clear_line(tmp_path):
    res = run_script("train.py", "backbone=nope", f"hydra.run.dir={tmp_path / 'a'}")
    assert res.returncode != 0 and "Available options in 'backbone'" in res.stderr and "wrn28_10" in res.stderr
    res = run_script("train.py", "debug=fast", "data=mnist", f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'b'}")
    assert res.returncode == 1
    assert f"error: dataset 'mnist' not found: looked for {tmp_path / 'nowhere'}" in res.stderr
    assert "Traceback" not in res.stderr
    assert json.loads((tmp_path / "b" / "failed.json").read_text())["error"].startswith("DatasetNotFoundError")
    # a constructor's own check, raised inside Hydra's instantiate, still reaches the user as one line
    tiny = [o for o in TINY if not o.startswith("backbone")]
    res = run_script("train.py", *tiny, "backbone=wrn28_2", "backbone.depth=29", f"hydra.run.dir={tmp_path / 'c'}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "error: backbone.depth: WideResNet depth must be 6n+4" in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a CPU-only machine gives for a GPU preset")
def test_gpu_preset_on_a_cpu_machine_names_trainer_cpu(tmp_path):
    res = run_script("train.py", "experiment=dhm_cifar10", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "error: trainer.accelerator=gpu but no CUDA device is visible" in res.stderr and "trainer=cpu" in res.stderr


def test_resolved_config_prints_the_schedule_milestones(tmp_path):
    res = run_script("train.py", "method=dhm", "trainer.max_epochs=200", "--cfg", "job", "--resolve")
    assert res.returncode == 0, res.stderr
    scheduler = res.stdout.split("scheduler:", 1)[1]
    assert re.search(r"milestones:\s*- 60\s*- 120\s*- 160", scheduler), scheduler[:400]


def test_heldout_classes_without_a_class_split_suggest_both_fixes(tmp_path):
    cfg = compose_cfg("train", [*[o for o in TINY if not o.startswith("ood")], "ood=near"], tmp_path)
    with pytest.raises(ConfigError, match=r"data.known_classes is null.*data=mnist6.*ood=\[odin,mnist,noise\]"):
        train(cfg)


def test_ood_set_of_another_shape_names_the_fix(tmp_path):
    cfg = compose_cfg("train", [*TINY, "+ood.noise={dataset: gaussian_noise, shape: [3, 32, 32]}"], tmp_path)
    with pytest.raises(ConfigError, match=r"'noise' has samples of shape \(3, 32, 32\).*ood.noise.convert=true"):
        train(cfg)


def test_wandb_offline_logs_without_an_account(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    train(compose_cfg("train", [*TINY, "logger=wandb", "detectors=fast"], tmp_path))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))
    assert wandb.run is None  # closed: the next job of an in-process multirun starts its own run


@needs_shared("MNIST/raw/train-images-idx3-ubyte")
def test_demo_config_on_real_mnist_split(tmp_path):
    """The README's demo at reduced size: held-out digits and noise sets, every baseline scored."""
    cfg = compose_cfg("train", ["debug=fast", "trainer=cpu", "data.limit_train=2000", "trainer.limit_train_batches=null",
                                "trainer.max_epochs=3",
                                "ood.gaussian.n=300", "ood.uniform.n=300", "ood.rademacher.n=300", "ood.blobs.n=300",
                                "+ood.heldout.limit=300"], tmp_path)
    metrics = train(cfg)
    assert metrics["accuracy"] > 0.8
    assert set(metrics["results"]["msp"]) == {"heldout", "gaussian", "uniform", "rademacher", "blobs", "mean_far"}
    assert metrics["results"]["mahalanobis"]["gaussian"]["auroc"] > 0.9
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["ood_lightning_config"]["data"]["name"] == "mnist"


def test_posthoc_methods_score_a_frozen_checkpoint(tiny_run, tmp_path):
    """method=lsgm / method=lde load backbone.checkpoint, train nothing, and add their scores
    to the baselines, which must equal those of the run that trained the checkpoint."""
    out, first = tiny_run
    ckpt = out / "checkpoints" / "last.ckpt"
    lsgm = train(compose_cfg("train", [*TINY, "method=lsgm", f"backbone.checkpoint={ckpt}",
                                       f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "lsgm"))
    assert lsgm["results"]["msp"] == first["results"]["msp"]
    assert lsgm["accuracy"] == first["accuracy"]
    assert {"lsgm", "gmm_per_layer", "mahalanobis"} <= set(lsgm["results"])
    assert 0 <= lsgm["results"]["lsgm"]["diagonal"]["auroc"] <= 1
    # the OOD-tuned Mahalanobis is scored on the 90% of the OOD set it was not tuned on
    scores = np.load(tmp_path / "lsgm" / "scores.npz")
    tuned = "mahalanobis_lr_uses_ood_data"
    rest = 256 - int(0.1 * 256)  # debug=fast caps the OOD set at 256; 10% of it tunes the weights
    assert len(scores[f"{tuned}/diagonal@diagonal"]) == rest and len(scores[f"{tuned}/id_test@diagonal"]) == 256
    truth = sklearn_auroc(scores[f"{tuned}/id_test@diagonal"], scores[f"{tuned}/diagonal@diagonal"])
    assert lsgm["results"][tuned]["diagonal"]["auroc"] == pytest.approx(truth)
    lde = train(compose_cfg("train", [*TINY, "method=lde", "method.fit.epochs=1", "~detectors.odin",
                                      f"backbone.checkpoint={ckpt}", "evaluation.feature_cache=false"], tmp_path / "lde"))
    assert {"lde", "lde_unnormalized"} <= set(lde["results"]) and "odin" not in lde["results"]
    assert not (tmp_path / "lde" / "checkpoints").exists()  # nothing was trained
    # the fit size is stated in the output: debug=fast caps the 1000 training inputs at 512;
    # method=lde's flows fit on augmented inputs (the paper's), every other scorer on plain ones
    for name in ("lsgm", "lde"):
        meta = json.loads((tmp_path / name / "metrics.json").read_text())
        assert (meta["fit_samples"], meta["fit_augmented"]) == (512, False)
        augmented = {s for s, split in meta["fit_splits"].items() if split["augmented"]}
        assert augmented == ({"lde", "lde_unnormalized"} if name == "lde" else set()), meta["fit_splits"]
        assert {split["samples"] for split in meta["fit_splits"].values()} == {512}


def test_posthoc_method_without_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"method=lsgm is post-hoc.*backbone.checkpoint="):
        train(compose_cfg("train", [*TINY, "method=lsgm"], tmp_path))


def test_second_posthoc_run_reuses_cached_features(tiny_run, tmp_path, monkeypatch, caplog):
    """A second post-hoc run on the same checkpoint and data makes no backbone forward pass, and
    projects nothing from the cache's read rate (it is no forward pass)."""
    import ood_lightning.scoring.loop as run_module

    out, _ = tiny_run
    calls = []
    real_extract = run_module.extract
    monkeypatch.setattr(run_module, "extract", lambda *a, **k: calls.append(k.get("description")) or real_extract(*a, **k))
    args = [*TINY, "method=lsgm", "detectors=fast", f"backbone.checkpoint={out / 'checkpoints' / 'last.ckpt'}",
            f"paths.cache_dir={tmp_path / 'cache'}"]
    projections = lambda: [r for r in caplog.records if "for the remaining passes" in r.getMessage()]  # noqa: E731
    with caplog.at_level("INFO", logger="ood_lightning.scoring.loop"):
        first = train(compose_cfg("train", args, tmp_path / "a"))
        assert len(calls) == 4  # id_train, id_val, id_test, diagonal
        assert len(projections()) == 1
        calls.clear()
        caplog.clear()
        second = train(compose_cfg("train", args, tmp_path / "b"))
    assert calls == [] and second["results"] == first["results"]
    assert projections() == []
    manifests = list((tmp_path / "cache" / "features").rglob("manifest.json"))
    assert len(manifests) == 4
