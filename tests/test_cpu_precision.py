"""CPU precision and layout switches: bf16 training asks for channels_last, ``evaluation.precision=bf16``
runs only the backbone and head in bf16 (every output, fit and density float32), densities stay float32
under CPU bf16 autocast, and the start-up thread choice and the CPU capability check."""

from __future__ import annotations

import copy
import logging
from functools import partial

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ood_lightning.core import cpu_runtime
from ood_lightning.core.errors import ConfigError
from ood_lightning.methods.dhm import DeepHybridModel
from ood_lightning.nn.backbones import SmallCNN
from ood_lightning.nn.flows.residual import ResidualFlow
from ood_lightning.nn.spectral import spectral_norm_bound
from ood_lightning.run.runtime import apply_eval_precision, resolve_channels_last
from ood_lightning.scoring.passes import extract

torch.set_num_threads(1)
CPU = torch.device("cpu")
BF16 = partial(torch.autocast, "cpu", dtype=torch.bfloat16)


def _dhm(seed: int = 0) -> DeepHybridModel:
    torch.manual_seed(seed)
    flow = partial(ResidualFlow, n_blocks=2, hidden=32, n_hidden_layers=1, activation_first=True, coeff=0.9,
                   n_power_iterations=2)
    return DeepHybridModel(SmallCNN(3, (8, 16), 16), 3, optimizer=partial(torch.optim.SGD, lr=0.1),
                           flow_optimizer=partial(torch.optim.Adam, lr=1e-3), flow=flow, lambda_=1e-2,
                           spectral_coeff=3.0)


def test_bf16_cpu_training_resolves_channels_last_and_fp32_keeps_nchw():
    assert resolve_channels_last("auto", CPU, "train", bf16=True)
    assert not resolve_channels_last("auto", CPU, "train", bf16=False)
    assert not resolve_channels_last("false", CPU, "train", bf16=True)  # an explicit choice wins


@pytest.mark.parametrize("train", [False, True])
def test_dhm_log_det_and_prior_are_float32_under_cpu_bf16_autocast_and_equal_the_fp32_values(train):
    model = _dhm()
    model.train(train)
    twin = copy.deepcopy(model)  # training mode steps the flow's power iterations in place
    h = torch.randn(32, 16)
    torch.manual_seed(1)  # the same roulette draw and probes in training mode
    ref_prior, ref_logdet = model.flow_terms(h)
    torch.manual_seed(1)
    with BF16():
        prior, logdet = twin.flow_terms(h)
    assert prior.dtype == logdet.dtype == torch.float32
    torch.testing.assert_close(logdet, ref_logdet, rtol=0, atol=0)  # not bf16-rounded: bit-identical
    torch.testing.assert_close(prior, ref_prior, rtol=0, atol=0)
    with BF16():  # the autocast context is live: a Linear outside flow_terms does run in bf16
        assert nn.Linear(16, 4)(h).dtype == torch.bfloat16


def test_spectral_power_iteration_is_float32_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    layers = [spectral_norm_bound(nn.Linear(40, 30), coeff=0.5, n_power_iterations=3) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(8, 40)
    layers[0](x)
    with BF16():
        layers[1](x)
    bound0, bound1 = (m.parametrizations.weight[0] for m in layers)
    assert bound1.u.dtype == torch.float32
    torch.testing.assert_close(bound1.u, bound0.u, rtol=0, atol=0)
    torch.testing.assert_close(layers[1].weight.float(), layers[0].weight, rtol=0, atol=0)


class _Holder(nn.Module):
    """What ``extract`` needs of a method: forward_features, classify, and a pass value (here the
    DHM's log-density of the penultimate features, computed in float32)."""

    def __init__(self):
        super().__init__()
        self.dhm = _dhm()

    def forward_features(self, x):
        return self.dhm.backbone.forward_features(x)

    def classify(self, f):
        return self.dhm.classify(f)

    def pass_values(self, x, feats):
        logdet = self.dhm.flow_terms(feats["penultimate"])[1]
        return {"logdet": logdet, "logdet_dtype": torch.full_like(logdet, float(logdet.dtype == torch.float32))}


def test_bf16_extraction_runs_the_backbone_in_bf16_and_returns_float32_outputs_and_densities():
    torch.manual_seed(0)
    model = _Holder().eval()
    x = torch.rand(48, 3, 16, 16)
    loader = DataLoader(TensorDataset(x, torch.zeros(48, dtype=torch.long)), batch_size=16)
    ref = extract(model, loader, lambda t: t, CPU, pass_values=model.pass_values)
    ours = extract(copy.deepcopy(model), loader, lambda t: t, CPU, pass_values=model.pass_values,
                   autocast=torch.bfloat16)
    for name in ref.layers:
        assert ours.layers[name].dtype == torch.float32, name
        # bf16 was really used: not bit-identical, but within bf16's rounding
        assert not torch.equal(ours.layers[name], ref.layers[name]), name
        rel = (ours.layers[name] - ref.layers[name]).norm() / ref.layers[name].norm()
        assert rel < 0.03, (name, rel)
    assert ours.logits.dtype == torch.float32
    assert bool(ours.extra["logdet_dtype"].all())  # the density term saw float32 features, autocast off
    # the log-det of the bf16 features equals the fp32 flow applied to those same features
    with torch.no_grad():
        exact = model.dhm.flow_terms(ours.features)[1]
    torch.testing.assert_close(ours.extra["logdet"], exact, rtol=1e-5, atol=1e-5)


def test_evaluation_precision_key(caplog):
    model = _Holder()
    assert apply_eval_precision(model, OmegaConf.create({"evaluation": {"precision": "fp32"}}), CPU) is None
    assert model.eval_autocast is None
    with caplog.at_level(logging.INFO):
        assert apply_eval_precision(model, OmegaConf.create({"evaluation": {"precision": "bf16"}}), CPU) is torch.bfloat16
    assert "bf16 autocast" in caplog.text
    with pytest.raises(ConfigError, match="evaluation.precision='fp16': choose fp32 or bf16"):
        apply_eval_precision(model, OmegaConf.create({"evaluation": {"precision": "fp16"}}), CPU)


def test_bf16_extraction_has_its_own_feature_cache_entry(tmp_path):
    """An fp32 run must never read features a bf16 run stored (nor the reverse)."""
    from ood_lightning.scoring.feature_cache import FeatureCache
    from ood_lightning.scoring.loop import split_outputs
    from tests.conftest import untrained_run

    cfg, dm, model = untrained_run(["data=stripes", "ood=diagonal_stripes", "backbone=cnn", "backbone.widths=[8,16]",
                                    "backbone.feature_dim=16", "data.n_train=64", "data.n_test=48",
                                    "data.val_size=16", "method=classifier"], tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    dm.setup("test")
    loader = dm.eval_dataloaders()["id_test"]
    fp32 = split_outputs(model, dm, "id_test", loader, dm.preprocess, CPU, cache=cache)
    model.eval_autocast = torch.bfloat16
    bf16 = split_outputs(model, dm, "id_test", loader, dm.preprocess, CPU, cache=cache)
    entries = sorted(p.parent.name for p in (tmp_path / "cache").rglob("manifest.json"))
    assert len(entries) == 2 and any(e.endswith("bfloat16") for e in entries), entries
    assert not torch.equal(fp32.features, bf16.features)
    model.eval_autocast = None
    again = split_outputs(model, dm, "id_test", loader, dm.preprocess, CPU, cache=cache)
    assert torch.equal(again.features, fp32.features)


# -- start-up thread choice and CPU capability ------------------------------------------------------------
def test_threads_default_to_one_on_a_small_machine_unless_the_user_chose():
    env: dict[str, str] = {}
    line = cpu_runtime.configure_threads(env, cores=2)
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1"
    assert "CPU threads: 1 intra-op" in line and "2 cores" in line
    assert "OMP_WAIT_POLICY" not in env  # one thread: nothing waits
    env = {"OMP_NUM_THREADS": "2"}
    line = cpu_runtime.configure_threads(env, cores=2)
    assert env == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"} and "set by the user" in line
    env = {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}
    line = cpu_runtime.configure_threads(env, cores=2)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and "ACTIVE (set by the user)" in line
    env = {}
    line = cpu_runtime.configure_threads(env, cores=16)
    assert "OMP_NUM_THREADS" not in env and "torch's default" in line


def test_fast_bf16_needs_amx(tmp_path):
    assert cpu_runtime.fast_bf16({"avx512f", "amx_bf16", "amx_tile"})
    assert not cpu_runtime.fast_bf16({"avx2", "fma"})
    assert not cpu_runtime.fast_bf16({"avx512_bf16"})  # not measured: stays float32
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert cpu_runtime.cpu_flags(info) == {"fpu", "avx2", "amx_bf16", "amx_tile"}
    assert cpu_runtime.cpu_flags(tmp_path / "missing") == set()


def test_one_key_switches_cpu_training_to_bf16_and_nhwc_and_warns_without_amx(tmp_path, monkeypatch, caplog):
    from ood_lightning.run import runtime
    from ood_lightning.run.build import build_model
    from tests.conftest import compose_cfg

    cfg = compose_cfg("train", ["data=stripes", "backbone=cnn", "backbone.widths=[8,16]", "backbone.feature_dim=16",
                                "trainer=cpu", "trainer.precision=bf16-mixed"], tmp_path)
    model = build_model(cfg, 3, pretrained=False)
    monkeypatch.setattr(runtime, "fast_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        applied = runtime.apply_speedups(model, cfg, CPU)
    assert applied["channels_last"]
    conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert "without AMX" in caplog.text
    fp32 = compose_cfg("train", ["data=stripes", "backbone=cnn", "trainer=cpu"], tmp_path)
    assert not runtime.apply_speedups(build_model(fp32, 3, pretrained=False), fp32, CPU)["channels_last"]
