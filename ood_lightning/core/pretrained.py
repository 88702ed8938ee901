"""Third-party pretrained weights: where they are found, where to get them, and the input
normalisation they were trained with (scoring them with another one costs accuracy silently)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ood_lightning.core.errors import ConfigError
from ood_lightning.core.roots import shared_root

#: folder under the models root -> where its files come from (said when one is missing)
SOURCES = {
    "cifar10-resnet-he2016": (
        "the public repository akamaster/pytorch_resnet_cifar10 (https://github.com/akamaster/pytorch_resnet_cifar10, "
        "its release files / pretrained_models folder: resnet20-12fca82f.th, resnet56-4bfd9763.th; BSD-2-Clause, keep "
        "its LICENSE beside them)"),
}


def models_root() -> str:
    """``$OOD_LIGHTNING_MODELS``, else the project's sibling ``shared/models``, else ``./models``
    (as ``data.registry.default_data_root`` finds the data)."""
    return shared_root("OOD_LIGHTNING_MODELS", "models")


def where_to_get(path: str | os.PathLike) -> str:
    """The hint a missing model file's error ends with: the models root and, for a known
    folder, the source of its files ("" for any other file)."""
    path = Path(path)
    source = next((text for folder, text in SOURCES.items() if folder in path.parts), None)
    if source is None:
        return ""
    return (f"; the models root is {models_root()} ($OOD_LIGHTNING_MODELS, else ../shared/models beside the "
            f"project, else ./models); download {path.name} from {source} into {path.parent}")


def _floats(values) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def check_input_normalisation(backbone: Mapping, data: Mapping) -> None:
    """Refuse a run whose ``data.mean``/``data.std`` differ from the ``backbone.input_mean``/
    ``input_std`` that pretrained weights declare (the ``*_pretrained`` backbone presets)."""
    want = _floats(backbone.get("input_mean")), _floats(backbone.get("input_std"))
    if want == (None, None):
        return
    have = _floats(data.get("mean")), _floats(data.get("std"))
    if not all(h is not None and len(h) == len(w) and all(abs(a - b) <= 1e-6 for a, b in zip(h, w))
               for h, w in zip(have, want)):
        raise ConfigError(
            f"backbone.checkpoint={backbone.get('checkpoint')} was trained on inputs normalised with mean {_show(want[0])} "
            f"std {_show(want[1])} (backbone.input_mean/input_std), but data.mean={_show(have[0])} "
            f"data.std={_show(have[1])}: drop the data.mean/data.std overrides (the pretrained backbone preset sets "
            f"them) or pass data.mean={_show(want[0])} data.std={_show(want[1])}")


def _show(values: Sequence[float] | None) -> str:
    return "null" if values is None else "[" + ",".join(f"{v:g}" for v in values) + "]"
