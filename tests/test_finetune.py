"""The ``finetune`` preset (method=classifier from a checkpoint, head included, low
LR, few epochs) composes as documented, and training starts from the checkpoint's weights: the
model's logits at training step 0 equal those of the published file loaded by hand."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ood_lightning.core.pretrained import models_root
from ood_lightning.methods import Classifier
from ood_lightning.run.build import build_backbone, build_model
from tests.conftest import compose_cfg

torch.set_num_threads(1)
MODELS = Path(models_root()) / "cifar10-resnet-he2016"
R20 = MODELS / "resnet20-12fca82f.th"


def test_finetune_preset_composes_low_lr_few_epochs_from_the_published_weights(tmp_path):
    cfg = compose_cfg("train", ["experiment=finetune_cifar10"], tmp_path)
    assert cfg.method._target_ == "ood_lightning.methods.Classifier"
    assert cfg.backbone.checkpoint == f"{models_root()}/cifar10-resnet-he2016/resnet20-12fca82f.th"
    assert list(cfg.data.mean) == [0.485, 0.456, 0.406] and list(cfg.data.std) == [0.229, 0.224, 0.225]
    assert cfg.method.optimizer.lr == pytest.approx(1e-3) and cfg.method.scheduler is None
    assert cfg.trainer.max_epochs == 2 and cfg.trainer.accelerator == "cpu" and cfg.data.name == "cifar10"
    r56 = compose_cfg("train", ["experiment=finetune_cifar10", "backbone=cifar_resnet56_pretrained"], tmp_path)
    assert r56.backbone.checkpoint.endswith("resnet56-4bfd9763.th") and r56.backbone._target_.endswith("cifar_resnet56")


class FirstStepLogits(L.Callback):
    """The model's eval-mode logits on ``x`` just before the first optimiser step."""

    def __init__(self, x):
        self.x, self.logits = x, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and trainer.global_step == 0:
            pl_module.eval()
            with torch.no_grad():
                self.logits = pl_module(self.x)
            pl_module.train()


@pytest.mark.skipif(not R20.is_file(), reason=f"pretrained ResNet-20 not found under {MODELS} (set "
                    "OOD_LIGHTNING_MODELS to a folder with shared/models' files)")
def test_finetuning_starts_from_the_checkpoint_weights_head_included(tmp_path):
    cfg = compose_cfg("train", ["experiment=finetune_cifar10", "logger=csv"], tmp_path)
    model = build_model(cfg, num_classes=10)
    assert isinstance(model, Classifier) and model.trains_backbone
    # the independent truth: the file read by hand with the layout its README gives (module. prefix, linear head)
    raw = {k.removeprefix("module."): v for k, v in torch.load(R20, map_location="cpu", weights_only=True)["state_dict"].items()}
    backbone = build_backbone(cfg)
    backbone.load_state_dict({k: v for k, v in raw.items() if not k.startswith("linear.")})
    head = nn.Linear(64, 10)
    head.load_state_dict({"weight": raw["linear.weight"], "bias": raw["linear.bias"]})
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = head(backbone.eval()(x))
    probe = FirstStepLogits(x)
    data = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, callbacks=[probe],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=data)
    assert probe.logits is not None and torch.allclose(probe.logits, expected, atol=1e-5)
    assert trainer.global_step == 2  # it trained, with the preset's optimiser
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), expected, atol=1e-6)  # the weights moved
