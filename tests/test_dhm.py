"""Deep Hybrid Model: the joint loss, the spectral bound after training, feature
normalisation, the collapse monitor, and a tiny end-to-end run through train.py."""

from __future__ import annotations

import csv
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ood_lightning.methods.dhm.collapse import CollapseMonitor
from ood_lightning.nn.feature_norm import normalize_features
from ood_lightning.run.runs import train
from tests.conftest import TINY, compose_cfg

DHM = [*TINY, "method=dhm", "method.flow.n_blocks=2", "method.flow.hidden=32"]


@pytest.mark.parametrize("kind,p", [("l1", 1), ("l2", 2), ("linf", math.inf)])
def test_feature_normalisation_gives_unit_norm(kind, p):
    h = torch.randn(5, 7) * 3
    out = normalize_features(h, kind)
    torch.testing.assert_close(torch.linalg.vector_norm(out, ord=p, dim=1), torch.ones(5))
    torch.testing.assert_close(out * torch.linalg.vector_norm(h, ord=p, dim=1, keepdim=True), h)
    assert torch.equal(normalize_features(h, "none"), h)


def test_collapse_monitor_flags_the_papers_jump_only():
    monitor = CollapseMonitor(factor=10.0)
    logged = []
    module = SimpleNamespace(log=lambda k, v: logged.append((k, v)))
    for epoch, value in enumerate([0.10, 0.12, 0.5, 1113.0, 1100.0]):
        trainer = SimpleNamespace(callback_metrics={"train/logdet": torch.tensor(value)}, current_epoch=epoch)
        monitor.on_train_epoch_end(trainer, module)
    assert [(e["epoch"], e["from"], e["to"]) for e in monitor.events] == [(3, 0.5, 1113.0)]
    assert logged == [("train/collapse", 1.0)]


@pytest.fixture(scope="module")
def dhm_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dhm")
    cfg = compose_cfg("train", [*DHM, "debug=fast", "trainer.max_epochs=3", "method.spectral_coeff=1.0",
                                "lambda=0.01", "detectors=fast"], out)
    metrics = train(cfg)
    return out, metrics, cfg


def test_dhm_trains_scores_and_logs(dhm_run):
    out, metrics, _ = dhm_run
    assert {"dhm", "msp", "energy", "mahalanobis"} <= set(metrics["results"])
    assert all(np.isfinite(v) for v in metrics["results"]["dhm"]["diagonal"].values())
    scores = np.load(out / "scores.npz")
    assert np.isfinite(scores["dhm/id_test"]).all() and np.isfinite(scores["dhm/diagonal"]).all()
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(loss) == 3 and loss[-1] < loss[0]
    for key in ("train/ce", "train/nll", "train/logdet", "val/acc", "val/auroc/diagonal"):
        assert any(r.get(key) for r in rows), key


def test_every_bounded_layer_has_spectral_norm_at_most_c(dhm_run):
    """Independent check: the operator norm of each conv/linear map from its exact Jacobian."""
    out, _, cfg = dhm_run
    from ood_lightning.run.build import build_model

    model = build_model(cfg, num_classes=2)
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    model.eval()
    layers = [m for m in model.backbone.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    inputs = {}

    def keep_input(module, args, output) -> None:  # returns None: a hook's return value would replace the output
        inputs[module] = args[0].detach()

    hooks = [m.register_forward_hook(keep_input) for m in layers]
    with torch.no_grad():
        model.backbone(torch.rand(1, 1, 9, 9))
    for h in hooks:
        h.remove()
    checked = 0
    for module in layers:
        x0, weight = inputs[module][:1], module.weight.detach()  # the effective (bounded) weight
        if isinstance(module, torch.nn.Conv2d):
            def linear_map(t, m=module, w=weight):
                return F.conv2d(t, w, None, m.stride, m.padding, m.dilation, m.groups)
        else:
            def linear_map(t, w=weight):
                return t @ w.T
        jac = torch.func.jacrev(linear_map)(x0)
        sigma = torch.linalg.matrix_norm(jac.reshape(math.prod(jac.shape[: x0.ndim]), -1), ord=2).item()
        assert sigma <= 1.0 * 1.02, (module, sigma)
        checked += 1
    assert checked >= 3
    # BatchNorm (method.spectral_bn, default): the eval-mode per-channel slope bn(1) - bn(0), measured by its forward
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 2  # backbone.widths=[8,16]: one per block
    for bn in bns:
        shape = (1, bn.num_features, 1, 1)
        with torch.no_grad():
            slope = (bn(torch.ones(shape)) - bn(torch.zeros(shape))).abs().max().item()
        assert slope <= 1.0 * (1 + 1e-5), (bn, slope)
    raw = [(bn.weight.abs() / (bn.running_var + bn.eps).sqrt()).max().item() for bn in bns]
    assert max(raw) > 1.0, f"the BN bound should be active in this run (free scales {raw})"


def test_lambda_zero_reduces_the_loss_to_cross_entropy():
    cfg = compose_cfg("train", [*DHM, "lambda=0.0"], "/tmp/unused")
    from ood_lightning.run.build import build_model

    model = build_model(cfg, num_classes=2)
    x, y = torch.rand(8, 1, 9, 9), torch.tensor([0, 1] * 4)
    terms = model.losses(x, y)
    torch.testing.assert_close(terms["loss"], F.cross_entropy(model.head(model.backbone(x)), y))
    assert torch.isfinite(terms["nll"]) and terms["nll"] != 0


def test_nan_in_the_flow_term_stops_with_all_terms(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    cfg = compose_cfg("train", [*DHM, "method.flow_optimizer.lr=1e30", "method.optimizer.lr=1e30",
                                "detectors=none"], tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .*ce=.*nll=.*logdet=.*checkpoint saved"):
        train(cfg)
