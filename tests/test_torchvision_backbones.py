"""ImageNet backbones load a local torchvision state_dict and give torchvision's features."""

from __future__ import annotations

import pytest
import torch
import torchvision

from ood_lightning.core.errors import ConfigError, DatasetNotFoundError
from ood_lightning.nn.backbones.torchvision_models import TorchvisionBackbone


@pytest.mark.parametrize("arch,dim", [("resnet50", 2048), ("swin_s", 768)])
def test_local_weights_reproduce_torchvision_logits(tmp_path, arch, dim):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None).eval()
    path = tmp_path / f"{arch}.pt"
    torch.save(reference.state_dict(), path)
    backbone = TorchvisionBackbone(arch, weights_path=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone.forward_features(x)
        logits = backbone.pretrained_head(feats["penultimate"])
        expected = reference(x)
    # four stages, the last one only as the pooled penultimate features (resnet50: layer4; swin: stage 7 normed)
    assert list(feats)[-1] == "penultimate" and feats["penultimate"].shape == (2, dim)
    assert len(feats) == (4 if arch == "resnet50" else 5)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_missing_weights_file_says_how_to_provide_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"resnet50 weights not found at .*backbone.weights_path="):
        TorchvisionBackbone("resnet50", weights_path=str(tmp_path / "nope.pt"))


def test_bad_arch_or_grey_inputs_name_the_key():
    with pytest.raises(ConfigError, match=r"backbone.arch: unknown torchvision arch 'vgg'; available: resnet50, swin_s"):
        TorchvisionBackbone("vgg")
    with pytest.raises(ConfigError, match=r"backbone.in_channels: resnet50 takes RGB inputs \(in_channels=3\), got 1"):
        TorchvisionBackbone("resnet50", in_channels=1)
