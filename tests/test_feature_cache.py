"""The feature cache: a hit makes no forward pass and returns what was stored; another
backbone on the same entry is refused with both hashes named."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ood_lightning.errors import CheckpointMismatchError
from ood_lightning.evaluation.feature_cache import FeatureCache, model_fingerprint
from ood_lightning.scoring.passes import extract


class TinyNet(nn.Module):
    """A FeatureModel with two named blocks and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(5, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        b1 = F.relu(self.fc1(x))
        return {"block1": b1, "penultimate": F.relu(self.fc2(b1))}

    def classify(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.forward_features(x)["penultimate"])


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(50, 5), torch.randint(0, 3, (50,))), batch_size=16)
    calls = []

    def counting_extract(*args, **kwargs):
        calls.append(kwargs.get("description"))
        return extract(*args, **kwargs)

    args = dict(loader=loader, preprocess=lambda x: x * 2, device="cpu", dataset="blobs", split="test",
                transform="default", extract_fn=counting_extract)
    return FeatureCache(tmp_path / "features"), TinyNet(), args, calls


def test_second_call_is_a_hit_without_forward_pass(setup):
    cache, model, args, calls = setup
    first = cache.get_or_extract(model, "id_test", **args)
    forwards = []
    model.fc1.register_forward_hook(lambda *_: forwards.append(1))
    second = cache.get_or_extract(model, "id_test", **args)
    assert calls == ["features: id_test"] and forwards == []
    assert torch.equal(first.logits, second.logits) and torch.equal(first.features, second.features)
    assert torch.equal(first.labels, second.labels)
    assert first.layers.keys() == second.layers.keys()
    assert all(torch.equal(first.layers[k], second.layers[k]) for k in first.layers)
    # the stored features are what an uncached pass gives
    assert torch.equal(second.features, extract(model, args["loader"], args["preprocess"], "cpu").features)


def test_manifest_names_the_entry(setup):
    cache, model, args, _ = setup
    cache.get_or_extract(model, "id_test", **args)
    entry = cache.path("blobs", "test", "default")
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["backbone"] == model_fingerprint(model)
    assert (manifest["dataset"], manifest["split"], manifest["transform"], manifest["n"]) == ("blobs", "test",
                                                                                                "default", 50)
    assert manifest["shapes"]["features"] == [50, 6] and manifest["dtype"] == "float32" and manifest["created"]
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "outputs.pt"]  # no temporary files left


def test_other_backbone_on_same_entry_is_refused(setup):
    cache, model, args, calls = setup
    cache.get_or_extract(model, "id_test", **args)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc2.weight[0, 0] += 1e-3
    old, new = model_fingerprint(model), model_fingerprint(other)
    assert old != new
    with pytest.raises(CheckpointMismatchError) as err:
        cache.get_or_extract(other, "id_test", **args)
    assert old in str(err.value) and new in str(err.value) and "delete it" in str(err.value)
    assert len(calls) == 1
    # a different split is a different entry, and the same weights in a fresh module hit
    cache.get_or_extract(other, "id_val", **{**args, "split": "val"})
    cache.get_or_extract(copy.deepcopy(model), "id_test", **args)
    assert len(calls) == 2


def test_fingerprint_follows_weights_and_buffers_only():
    a = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    b = copy.deepcopy(a)
    assert model_fingerprint(a) == model_fingerprint(b) and len(model_fingerprint(a)) == 16
    b[1].running_mean += 1
    assert model_fingerprint(a) != model_fingerprint(b)
