"""Generalized ODIN (DeConf-C): the head's algebra, the weight-decay exemption, that a tiny
model learns to classify and to score far-away points lower, and the input perturbation."""

from __future__ import annotations

import json
import warnings
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from ood_lightning.core.errors import ConfigError
from ood_lightning.methods.classifier import Classifier
from ood_lightning.methods.godin.model import GeneralizedODIN
from ood_lightning.methods.godin.perturbation import GODINPerturbation
from ood_lightning.nn.backbones import ResidualMLP
from ood_lightning.scoring.api import FitData, Outputs
from tests.conftest import TINY, check_reported_metrics, compose_cfg

SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
CENTERS = 4.0 * torch.eye(8)[:3]  # three Gaussian blobs in 8-D, unit variance


def own_scores(model, outputs) -> dict:
    """Every own score of a method on ``outputs``, as the evaluation loop computes them."""
    return {name: scorer.score(model, outputs) for name, scorer in model.scorers().items()}


def _model(seed: int = 0) -> GeneralizedODIN:
    torch.manual_seed(seed)
    return GeneralizedODIN(ResidualMLP(in_features=8, hidden=16, depth=2), num_classes=3, optimizer=SGD)


def _blobs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 3, (n,), generator=gen)
    return CENTERS[y] + torch.randn(n, 8, generator=gen), y


def _far_points(n: int, gen: torch.Generator) -> torch.Tensor:
    """Radius 20, in directions orthogonal to every blob centre. (Uniformly random directions
    partly extrapolate along a class axis, where a direction-only score like the cosine
    rightly sees a class; that is not what "far from the data" should test.)"""
    d = torch.randn(n, 8, generator=gen)
    d[:, :3] = 0
    return 20 * F.normalize(d, dim=1)


def _outputs(model: GeneralizedODIN, x: torch.Tensor) -> Outputs:
    with torch.no_grad():
        f = model.backbone(x)
        return Outputs(logits=model.classify(f), features=f)


@pytest.fixture(scope="module")
def trained() -> GeneralizedODIN:
    """300 SGD steps of batch 64 through the method's own training_step and optimiser (~1 s)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    model = _model().train()
    opt = model.configure_optimizers()
    for step in range(300):
        with warnings.catch_warnings():  # self.log() without a Trainer is a no-op that warns
            warnings.filterwarnings("ignore", "You are trying to `self.log", UserWarning)
            loss = model.training_step(_blobs(64, gen), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)  # so tests can check that scoring leaves .grad alone
    return model.eval()


def test_h_is_cosine_similarity_and_logits_are_h_over_g() -> None:
    model = _model().eval()
    f = torch.randn(5, 16).relu()
    with torch.no_grad():
        h, g = model.decomposed(f)
        logits = model.classify(f)
    w = model.head.h.weight
    by_hand = torch.stack([F.cosine_similarity(f, w[i].expand_as(f), dim=1) for i in range(3)], dim=1)
    torch.testing.assert_close(h, by_hand)
    torch.testing.assert_close(logits, h / g[:, None])
    assert g.shape == (5,) and ((g > 0) & (g < 1)).all()
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.classify(model.backbone(x)))


def test_g_is_sigmoid_of_batchnormed_linear_in_training_mode() -> None:
    model = _model().train()
    f = torch.randn(32, 16)
    _, g = model.decomposed(f)
    linear, bn = model.head.g[0], model.head.g[1]
    z = linear(f).squeeze(1)
    expected = torch.sigmoid((z - z.mean()) / torch.sqrt(z.var(unbiased=False) + bn.eps) * bn.weight + bn.bias)
    torch.testing.assert_close(g, expected)
    assert ((g > 0) & (g < 1)).all()


def test_h_weights_get_no_weight_decay() -> None:
    model = _model()
    opt = model.configure_optimizers()
    groups = opt.param_groups
    assert len(groups) == 2
    h_groups = [g for g in groups if any(p is model.head.h.weight for p in g["params"])]
    assert len(h_groups) == 1 and h_groups[0]["params"] == [model.head.h.weight]
    assert h_groups[0]["weight_decay"] == 0.0
    rest = next(g for g in groups if g is not h_groups[0])
    assert rest["weight_decay"] == 5e-4
    # Every parameter is optimised exactly once (backbone and g included).
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())


def test_config_builds_method_with_exemption(tmp_path) -> None:
    from ood_lightning.run.build import build_model

    cfg = compose_cfg("train", [*TINY, "method=godin", "method.h_weight_decay=1e-5"], tmp_path)
    model = build_model(cfg, num_classes=2)
    assert isinstance(model, GeneralizedODIN)
    opt = model.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 1e-5]


def test_ood_scores_read_cached_features_without_changing_bn() -> None:
    model = _model().train()  # even in training mode g's BN must use, not update, its running stats
    f = torch.randn(7, 16).relu()
    before = model.head.g[1].running_mean.clone()
    scores = own_scores(model, Outputs(logits=torch.zeros(7, 3), features=f))
    assert model.training and model.head.training
    torch.testing.assert_close(model.head.g[1].running_mean, before)
    model.eval()
    with torch.no_grad():
        h, g = model.decomposed(f)
    assert set(scores) == {"godin_h", "godin_g"}
    torch.testing.assert_close(scores["godin_h"], h.amax(1))
    torch.testing.assert_close(scores["godin_g"], g)


def test_tiny_training_classifies_and_detects_far_points(trained: GeneralizedODIN) -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = _blobs(600, gen)
    far = _far_points(600, gen)
    id_out, ood_out = _outputs(trained, x), _outputs(trained, far)
    assert (id_out.logits.argmax(1) == y).float().mean() > 0.9
    id_s, ood_s = own_scores(trained, id_out), own_scores(trained, ood_out)
    labels = [1] * len(x) + [0] * len(far)  # ID = positive
    assert roc_auc_score(labels, torch.cat([id_s["godin_h"], ood_s["godin_h"]]).numpy()) > 0.8


@pytest.mark.parametrize("epsilon", [0.0025, 0.01, 0.08])
def test_perturbation_increases_max_h_on_id_inputs(trained: GeneralizedODIN, epsilon: float) -> None:
    x, _ = _blobs(200, torch.Generator().manual_seed(2))
    det = GODINPerturbation(epsilon=epsilon)
    assert det.per_batch
    clean = own_scores(trained, _outputs(trained, x))["godin_h"]
    perturbed = det.score_batch(trained, x)
    assert (perturbed - clean).mean() > 0
    assert (perturbed >= clean).float().mean() > 0.95
    assert all(p.grad is None for p in trained.parameters())  # gradient w.r.t. the input only


def test_select_epsilon_maximises_mean_id_validation_score(trained: GeneralizedODIN) -> None:
    x, _ = _blobs(300, torch.Generator().manual_seed(3))
    det = GODINPerturbation(epsilon=0.0, batch_size=128)  # batches of 128/128/44
    det.fit(trained, FitData(val_inputs=x))  # the evaluation's fit: ID validation inputs only
    chosen = det.epsilon
    assert set(det.search) == set(det.epsilons) and det.epsilon == chosen
    assert chosen == max(det.search, key=det.search.get)
    for eps in (0.0, chosen):  # the recorded means are those score_batch gives
        expected = GODINPerturbation(epsilon=eps).score_batch(trained, x).mean()
        assert det.search[eps] == pytest.approx(float(expected), rel=1e-5)
    assert chosen > 0  # sign-gradient ascent raises the mean ID score on this model


def test_epsilon_zero_and_g_score_from_cached_outputs(trained: GeneralizedODIN) -> None:
    x, _ = _blobs(50, torch.Generator().manual_seed(4))
    out = _outputs(trained, x)
    own = own_scores(trained, out)
    for name in ("h", "g"):
        det = GODINPerturbation(epsilon=0.0, score=name)
        assert not det.per_batch
        torch.testing.assert_close(det.score(trained, out), own[f"godin_{name}"])
        torch.testing.assert_close(det.score_batch(trained, x), own[f"godin_{name}"])
    with pytest.raises(RuntimeError, match="score_batch"):
        GODINPerturbation(epsilon=0.01).score(trained, out)


def test_perturbation_detector_rejects_bad_arguments_and_models() -> None:
    with pytest.raises(ValueError, match="'h'"):
        GODINPerturbation(score="energy")
    with pytest.raises(ValueError, match="epsilon"):
        GODINPerturbation(epsilons=(-0.1,))
    classifier = Classifier(ResidualMLP(in_features=8, hidden=16, depth=2), num_classes=3, optimizer=SGD)
    with pytest.raises(ConfigError, match="method=godin"):
        GODINPerturbation().score_batch(classifier, torch.randn(2, 8))


@pytest.mark.slow
def test_train_entrypoint_reports_godin_scores(tmp_path) -> None:
    from ood_lightning.run.runs import train

    torch.set_num_threads(1)
    cfg = compose_cfg("train", [*TINY, "method=godin", "detectors=none"], tmp_path)
    returned = train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["results"]) == {"godin_h", "godin_g"} and returned["results"] == metrics["results"]
    scores = np.load(tmp_path / "scores.npz")
    assert len(scores["godin_h/diagonal"]) == 256  # debug=fast: data.limit_ood
    check_reported_metrics(metrics, scores, "diagonal", ("godin_h", "godin_g"), num_classes=2)
    assert metrics["accuracy"] == pytest.approx(float(np.mean(scores["preds/id_test"] == scores["labels/id_test"])))


