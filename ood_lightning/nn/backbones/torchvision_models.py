"""ImageNet backbones from torchvision (ResNet-50, Swin-S) with weights from a local file.

Nothing is downloaded: ``weights_path`` points at a ``state_dict`` saved from torchvision
(e.g. ``torch.save(resnet50(weights="IMAGENET1K_V2").state_dict(), path)`` on a machine
that is online). The ImageNet classifier is kept as ``pretrained_head`` so that post-hoc
methods can use the 1000-way logits (MSP, Energy, ...) when the ID set is ImageNet.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from ood_lightning.core.checkpoints import read_checkpoint
from ood_lightning.core.errors import ConfigError, DatasetNotFoundError
from ood_lightning.nn.backbones.base import Backbone

#: architecture -> (feature dim, names of the stages whose outputs forward_features returns)
_ARCHS = {
    "resnet50": (2048, ("layer1", "layer2", "layer3", "layer4")),
    "swin_s": (768, ("1", "3", "5", "7")),
}


class TorchvisionBackbone(Backbone):
    def __init__(self, arch: str = "resnet50", weights_path: str | None = None, in_channels: int = 3):
        super().__init__()
        if arch not in _ARCHS:
            raise ConfigError(f"backbone.arch: unknown torchvision arch {arch!r}; available: {', '.join(_ARCHS)}")
        if in_channels != 3:
            raise ConfigError(f"backbone.in_channels: {arch} takes RGB inputs (in_channels=3), got {in_channels}; "
                              "use an RGB ID data set (its data.channels sets in_channels)")
        self.arch = arch
        self.feature_dim, self._stages = _ARCHS[arch]
        model = getattr(torchvision.models, arch)(weights=None)
        if weights_path is not None:
            path = Path(weights_path)
            if not path.is_file():
                raise DatasetNotFoundError(
                    f"{arch} weights not found at {path}: save torchvision's ImageNet state_dict there on an online "
                    f"machine (torch.save(torchvision.models.{arch}(weights='DEFAULT').state_dict(), '{path}')) "
                    "or pass backbone.weights_path=<file>")
            model.load_state_dict(read_checkpoint(path, key="backbone.weights_path"))
        self.pretrained_head = model.fc if arch == "resnet50" else model.head
        if arch == "resnet50":
            model.fc = nn.Identity()
        else:
            model.head = nn.Identity()
        self.model = model

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        m = self.model
        if self.arch == "resnet50":
            h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            for name in self._stages:
                h = getattr(m, name)(h)
                if name != self._stages[-1]:  # the last stage is the penultimate features, pooled
                    out[name] = h
            out["penultimate"] = torch.flatten(m.avgpool(h), 1)
        else:  # swin: stages are channels-last [B, H, W, C]
            h = x
            for name, block in m.features.named_children():
                h = block(h)
                if name in self._stages:
                    out[f"stage{name}"] = h.permute(0, 3, 1, 2)
            out["penultimate"] = m.flatten(m.avgpool(m.permute(m.norm(h))))
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)["penultimate"]
