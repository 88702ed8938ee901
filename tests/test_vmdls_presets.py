"""VMDLS presets as the paper ran them: the CROSR CNN on MNIST (its layers and
parameter count from the description, by hand), the authors' CIFAR-10 optimiser (against torch's
StepLR), Table 4's M_d = 32 and Table 5 on CIFAR-10 vs ImageNet-resize with weighted scores, read
from the commands sweeps/vmdls_ablations.sh really runs."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.nn.backbones import CROSRCNN
from ood_lightning.run.build import build_backbone, build_model
from tests.conftest import ROOT, compose_cfg

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------- CROSR CNN
def _crosr_params(in_channels: int, side: int) -> int:
    """By hand: 5 convs 3x3 (100 out, with bias), then Linear(100 * (side // 8)^2 -> 500)."""
    first = in_channels * 100 * 9 + 100
    others = 4 * (100 * 100 * 9 + 100)
    fc = 100 * (side // 8) ** 2 * 500 + 500
    return first + others + fc


@pytest.mark.parametrize(("data", "channels", "side", "total"),
                         [("mnist", 1, 28, 811_900), ("cifar10", 3, 32, 1_163_700)])
def test_crosr_cnn_layers_and_parameter_count(data, channels, side, total, tmp_path):
    assert _crosr_params(channels, side) == total
    net = build_backbone(compose_cfg("train", ["backbone=crosr_cnn", f"data={data}"], tmp_path)).eval()
    assert isinstance(net, CROSRCNN)
    assert sum(p.numel() for p in net.parameters()) == total
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5 and all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.out_channels == 100
                                   for c in convs)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in net.modules())
    with torch.no_grad():
        feats = net.forward_features(torch.randn(2, channels, side, side))
    s = side
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "block1": (2, 100, s // 2, s // 2), "block2": (2, 100, s // 4, s // 4), "block3": (2, 100, s // 8, s // 8),
        "penultimate": (2, 500)}
    assert (feats["penultimate"] < 0).any()  # the linear output, no ReLU (the authors' encoder)
    with pytest.raises(ConfigError, match="built for"):
        net(torch.randn(1, channels, side + 4, side + 4))


def test_mnist_preset_trains_the_crosr_cnn(tmp_path):
    cfg = compose_cfg("train", ["experiment=vmdls_mnist"], tmp_path)
    assert cfg.backbone._target_.endswith("CROSRCNN") and cfg.backbone.image_size == 28
    model = build_model(cfg, num_classes=10, pretrained=False)
    assert isinstance(model.backbone, CROSRCNN) and model.latent.mu.in_features == 500
    assert model.layers == ["block1", "block2", "block3", "penultimate", "mu"]
    # paper=vmdls compares a run of it with Table 3's VMDLS rows as the same backbone
    from ood_lightning.evaluation.paper_compare import backbone_label
    from ood_lightning.evaluation.references import load

    table3 = {row.backbone for row in load("vmdls") if row.table == "3" and row.method.startswith("vmdls")}
    assert table3 == {backbone_label("crosr_cnn")}


def test_mnist_preset_trains_channels_last_with_the_nchw_step(tmp_path):
    """The preset trains the CROSR CNN in channels_last on the CPU too (benchmarks/vmdls_step.py:
    1.12x less CPU time per step): the same loss and gradients as NCHW, on the same weights, inputs
    and noise (the layout changes summation order only)."""
    from ood_lightning.run.runtime import apply_speedups, resolve_channels_last

    cfg = compose_cfg("train", ["experiment=vmdls_mnist"], tmp_path)
    assert resolve_channels_last(cfg.channels_last, torch.device("cpu"), "train")
    torch.manual_seed(0)
    nchw = build_model(cfg, num_classes=10, pretrained=False)
    nhwc = build_model(cfg, num_classes=10, pretrained=False)
    nhwc.load_state_dict(nchw.state_dict())
    assert apply_speedups(nhwc, cfg, torch.device("cpu"))["channels_last"]
    assert nhwc.backbone.block1[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, y = torch.randn(20, 1, 28, 28), torch.arange(10).repeat_interleave(2)
    results = []
    for model in (nchw, nhwc):
        mu, logvar = model.latent(model.backbone(x))
        z = mu + torch.exp(0.5 * logvar)  # the reparameterised sample at eps = 1, identical for both
        loss = sum(model.weights[k] * v for k, v in model.loss_terms(z, mu, logvar, y).items())
        model.zero_grad()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.backbone.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(grads_a, grads_b):  # float32 summation order: relative to each gradient's norm
        # float32 summation order through five 100-channel convs: ~1e-3 relative; a wrong layout is O(1)
        assert float((gb - ga).norm() / ga.norm()) < 1e-2


# ---------------------------------------------------------------------------------- CIFAR-10 optimiser
def test_cifar10_preset_uses_the_authors_sgd_and_step_schedule(tmp_path):
    """SGD-Nesterov (momentum 0.9), lr 0.01 (the authors' README command), weight decay 1e-4, lr x0.1
    every 100 epochs: the learning rate of every one of 350 epochs equals torch's StepLR(step_size=100,
    gamma=0.1)."""
    cfg = compose_cfg("train", ["experiment=vmdls_cifar10", "trainer.max_epochs=350"], tmp_path)
    params = [nn.Parameter(torch.zeros(1))]
    opt = instantiate(cfg.method.optimizer)(params)
    assert type(opt) is torch.optim.SGD
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (1e-2, 0.9, True, 1e-4)
    ours = instantiate(cfg.method.scheduler)(opt)
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-2)
    ref = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=100, gamma=0.1)
    for epoch in range(350):
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12), epoch
        opt.step()  # no gradients: the parameters stay, the schedulers see a step first
        ref_opt.step()
        ours.step()
        ref.step()
    assert list(compose_cfg("train", ["experiment=vmdls_cifar10", "trainer.max_epochs=100"],
                            tmp_path).method.scheduler.milestones) == []


# ---------------------------------------------------------------------------------- ablation driver
def _driver_commands(study: str, tmp_path: Path) -> list[list[str]]:
    env = {**os.environ, "PYTHON": "echo", "VMDLS_OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(ROOT / "sweeps" / "vmdls_ablations.sh"), study], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    return [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]


def _train_runs(commands: list[list[str]], tmp_path: Path) -> dict:
    """Run name (its hydra.run.dir) -> the config that command composes."""
    runs = {}
    for cmd in commands:
        if cmd[0] != "train.py":
            continue
        run_dir = next(a for a in cmd if a.startswith("hydra.run.dir=")).split("=", 1)[1]
        overrides = [a for a in cmd[1:] if not a.startswith("hydra.run.dir=")]
        runs[Path(run_dir).name] = compose_cfg("train", overrides, tmp_path)
    return runs


def test_table4_runs_are_the_papers_losses_on_mnist(tmp_path):
    runs = _train_runs(_driver_commands("losses", tmp_path), tmp_path)
    assert set(runs) == {"t", "t_mt1", "t_d32", "kl_t", "kl_t_d1", "kl_t_d32"}
    for cfg in runs.values():
        assert cfg.data.name == "mnist" and cfg.method.latent_dim == 2 and cfg.backbone._target_.endswith("CROSRCNN")
    m = {name: cfg.method for name, cfg in runs.items()}
    # (KL on, L_d on, M_t, M_d); M_d only matters where L_d is on
    table = {name: (m[name].kl_weight > 0, m[name].distance_weight > 0, m[name].triplet_margin,
                    m[name].distance_margin if m[name].distance_weight > 0 else None) for name in m}
    assert table == {"t": (False, False, 0.1, None), "t_mt1": (False, False, 1.0, None), "t_d32": (False, True, 0.1, 32),
                     "kl_t": (True, False, 0.1, None), "kl_t_d1": (True, True, 0.1, 1), "kl_t_d32": (True, True, 0.1, 32)}


def test_table5_runs_on_cifar10_vs_imagenet_resize_with_weighted_scores(tmp_path):
    commands = _driver_commands("features", tmp_path)
    runs = _train_runs(commands, tmp_path)
    cfg = runs["features"]
    assert cfg.data.name == "cifar10" and cfg.ood.tin_resize.dataset == "tinyimagenet_resize"
    assert cfg.method.ensemble_ablation and cfg.method.autoencoder is not None  # w is on: VMDLS, not VMDLS_b
    assert ["sweeps/vmdls_studies.py", "table5"] == commands[1][:2] and commands[1][-2:] == ["--ood", "tin_resize"]
    model = build_model(compose_cfg("train", ["experiment=vmdls_cifar10", "method.ensemble_ablation=true",
                                              "backbone=cnn", "trainer=cpu"], tmp_path), 10, pretrained=False)
    studies = _studies()
    assert {name for name, _ in studies.TABLE5.values()} <= set(model.scorers())
    # the study reads the weighted scores (not the vmdls_b_* ones) and prints the paper's values beside them
    results = {name: {"tin_resize": {"macro_f1": 0.5 + i / 100}} for i, name in enumerate(sorted(model.scorers()))}
    (tmp_path / "metrics.json").write_text(json.dumps({"results": results}))
    rows = studies.table5(tmp_path).splitlines()[2:]
    expected = {"(t1, t2, t3, g, mu)": "vmdls", "(t2, t3, g, mu)": "vmdls_mu_g_t3_t2", "(t3, g, mu)": "vmdls_mu_g_t3",
                "(g, mu)": "vmdls_mu_g", "mu": "vmdls_mu"}
    paper = {"vmdls": 0.927, "vmdls_mu_g_t3_t2": 0.925, "vmdls_mu_g_t3": 0.919, "vmdls_mu_g": 0.918, "vmdls_mu": 0.906}
    for row, (features, name) in zip(rows, expected.items(), strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells == [features, name, f"{results[name]['tin_resize']['macro_f1']:.3f}", f"{paper[name]:.3f}"]
    with pytest.raises(SystemExit, match="ensemble_ablation"):
        (tmp_path / "metrics.json").write_text(json.dumps({"results": {"vmdls": results["vmdls"]}}))
        studies.table5(tmp_path)


def test_the_driver_rejects_an_unknown_study(tmp_path):
    env = {**os.environ, "PYTHON": "echo", "VMDLS_OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "sweeps" / "vmdls_ablations.sh"), "table5"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "losses, features or all" in done.stderr and not done.stdout


def _studies():
    spec = importlib.util.spec_from_file_location("vmdls_studies", ROOT / "sweeps" / "vmdls_studies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
