"""Tests that grow with conf/: every experiment composes, every backbone meets the feature
contract, every detector entry fits and scores, every method trains a step and scores. A new
config file is tested without editing a list here."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ood_lightning.methods.base import OODMethod
from ood_lightning.nn.backbones.base import Backbone
from ood_lightning.run.build import build_backbone, build_model
from ood_lightning.scoring.api import FitData, Outputs, Scorer, pool
from ood_lightning.scoring.loop import score_all
from tests.conftest import CONF, TINY, compose_cfg, untrained_run

torch.set_num_threads(1)


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# ------------------------------------------------------------------------------------ experiments
@pytest.mark.parametrize("name", _names("experiment"))
def test_every_experiment_composes(name: str, tmp_path: Path) -> None:
    """GPU presets are only composed (and resolved); CPU presets also build their model."""
    cfg = compose_cfg("train", [f"experiment={name}"], tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.method._target_
    if cfg.trainer.get("accelerator") == "gpu" or not cfg.method.get("_target_"):
        return
    model = build_model(cfg, num_classes=2, pretrained=False)
    assert isinstance(model, OODMethod) and all(isinstance(s, Scorer) for s in model.scorers().values())


# ------------------------------------------------------------------------------------ backbones
#: the data each backbone is built for (its input shape)
_BACKBONE_DATA = {"mlp2d": ["data=moons"], "dcgan": ["data=stripes"], "prewitt": ["data=stripes"]}
_IMAGENET = {"resnet50_imagenet", "swin_s_imagenet"}


@pytest.mark.parametrize("name", _names("backbone"))
def test_every_backbone_meets_the_feature_contract(name: str, tmp_path: Path) -> None:
    """forward_features: stage names unique, in order, "penultimate" last with [B, feature_dim];
    no stage repeats the penultimate features (the last stage appears once); forward = penultimate."""
    data = _BACKBONE_DATA.get(name, ["data=cifar10"])
    cfg = compose_cfg("train", [f"backbone={name}", *data], tmp_path)
    if name in _IMAGENET:
        with torch.device("meta"):  # 50M+ parameters from no weights file: shapes only
            backbone = build_backbone(cfg)
        assert isinstance(backbone, Backbone)
        return
    backbone = build_backbone(cfg).eval()
    assert isinstance(backbone, Backbone)
    c = cfg.data
    shape = (2,) if name == "mlp2d" else (c.channels, c.image_size, c.image_size)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        feats = backbone.forward_features(x)
        plain = backbone(x)
    names = list(feats)
    assert names[-1] == "penultimate" and len(set(names)) == len(names)
    assert feats["penultimate"].shape == (2, backbone.feature_dim)
    torch.testing.assert_close(plain, feats["penultimate"])
    for stage in names[:-1]:
        pooled = pool(feats[stage])
        assert pooled.shape != feats["penultimate"].shape or not torch.allclose(pooled, feats["penultimate"]), stage


# ------------------------------------------------------------------------------------ detectors
class _TinyClassifier(OODMethod):
    """A fixed two-stage model on 4-d inputs (3 classes) for scoring every detector."""

    def __init__(self) -> None:
        from ood_lightning.nn.backbones import ResidualMLP

        torch.manual_seed(0)
        super().__init__(ResidualMLP(in_features=4, hidden=8, depth=2), num_classes=3, optimizer=None)


def _outputs(model: OODMethod, x: torch.Tensor, y: torch.Tensor) -> Outputs:
    with torch.no_grad():
        feats = model.forward_features(x)
    return Outputs(model.classify(feats["penultimate"]), feats["penultimate"], {k: pool(v) for k, v in feats.items()}, y)


def _detector_entries() -> list[tuple[str, str]]:
    entries = []
    for preset in _names("detectors"):
        cfg = compose_cfg("train", [f"detectors={preset}"], Path("/tmp/unused"))
        entries += [(preset, name) for name in (cfg.detectors or {})]
    return entries


@pytest.mark.parametrize(("preset", "name"), _detector_entries())
def test_every_detector_entry_fits_and_scores_a_tiny_model(preset: str, name: str, tmp_path: Path) -> None:
    spec = compose_cfg("train", [f"detectors={preset}", "data=moons"], tmp_path).detectors[name]  # vector inputs
    scorer = instantiate(spec)
    assert isinstance(scorer, Scorer)
    model = _TinyClassifier().eval()
    if "godin" in name:
        pytest.skip("GODINPerturbation needs a method=godin model (tests/test_godin.py)")
    g = torch.Generator().manual_seed(1)
    x_train, y_train = torch.randn(300, 4, generator=g), torch.arange(300) % 3
    x_test = torch.randn(40, 4, generator=g)
    train = _outputs(model, x_train, y_train)
    scorer.fit(model, FitData(train=train, val_inputs=x_test))
    values = scorer.score_batch(model, x_test) if scorer.per_batch else scorer.score(model, _outputs(model, x_test, None))
    assert values.shape == (40,) and torch.isfinite(values).all()


# ------------------------------------------------------------------------------------ methods
#: tiny settings per method (the method's backbone and data needs), on top of TINY
_METHOD_TINY = {
    "dhm": ["method.flow.n_blocks=1", "method.flow.hidden=8", "method.monitor_ood.sets=[]"],
    "vae": ["backbone=dcgan", "backbone.widths=[4,8]", "method.latent_dim=2", "method.iwae_samples=[2]",
            "method.early_stopping=null"],
    "ganvae": ["backbone=dcgan", "backbone.widths=[4,8]", "method.latent_dim=2", "method.iwae_samples=[2]"],
    "vmdls": ["method.latent_dim=2", "method.classes_per_batch=2", "method.samples_per_class=4",
              "method.autoencoder.widths=[4,4]", "method.autoencoder.bottleneck=2", "method.layers=[penultimate,mu]",
              "method.reconstruction_layer=block1"],
    "lde": ["method.fit.epochs=1", "method.flow.n_blocks=1", "method.flow.hidden=8"],
    "lsgm": ["method.scorers.lsgm.n_components=2", "method.scorers.gmm_per_layer.n_components=2",
             "method.scorers.lsgm.max_iter=5", "method.scorers.gmm_per_layer.max_iter=5",
             "method.scorers.lsgm.mixture=gmm", "method.scorers.gmm_per_layer.mixture=gmm",
             "method.scorers.lsgm.pca_dim=4", "method.scorers.gmm_per_layer.pca_dim=4"],
}


@pytest.mark.parametrize("name", _names("method"))
def test_every_method_trains_one_step_and_scores(name: str, tmp_path: Path) -> None:
    """One training step (post-hoc methods: none) on the tiny stripes task, then every own scorer and
    the fast detectors score every split with finite values of the right length."""
    extra = _METHOD_TINY.get(name, [])
    tiny = [o for o in TINY if not o.startswith("backbone")] if any(o.startswith("backbone=") for o in extra) else TINY
    overrides = [*tiny, f"method={name}", "detectors=fast", "data.n_train=200", "data.val_size=40", "data.n_test=60",
                 "ood.diagonal.n=60", "evaluation.fit_limit=120", *extra]
    cfg, dm, model = untrained_run(overrides, tmp_path)
    if model.trains_backbone:
        trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, datamodule=dm)
    detectors = {} if not model.has_classifier else {"msp": instantiate(cfg.detectors.msp)}
    results = score_all(model, dm, detectors, "cpu", fit_limit=cfg.evaluation.fit_limit)
    own = set(model.scorers())
    assert {k.scorer for k in results.scores} == own | set(detectors)
    sizes = {"id_val": 40, "id_test": 60, "diagonal": 60}
    for key, values in results.scores.items():
        if key.tuned_for is None:
            assert values.shape == (sizes[key.split],), key
        assert torch.isfinite(values).all(), key
