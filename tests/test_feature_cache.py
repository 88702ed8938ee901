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

from ood_lightning.core.errors import CheckpointMismatchError
from ood_lightning.scoring.feature_cache import FeatureCache, model_fingerprint
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


def test_extra_per_input_values_survive_a_cache_hit(setup):
    """A method's per-input values (``Outputs.extra``, e.g. a VAE's IWAE bound) come back from disk."""
    cache, model, args, calls = setup

    def extract_with_extra(*a, **k):
        out = args["extract_fn"](*a, **k)
        out.extra = {"iwae": out.logits.sum(1) * 3, "recon": out.features[:, 0].clone()}
        return out

    first = cache.get_or_extract(model, "id_test", **{**args, "extract_fn": extract_with_extra})
    second = cache.get_or_extract(model, "id_test", **{**args, "extract_fn": extract_with_extra})
    assert len(calls) == 1 and set(second.extra) == {"iwae", "recon"}
    assert all(torch.equal(first.extra[k], second.extra[k]) for k in first.extra)
    assert torch.equal(second.extra["iwae"], second.logits.sum(1) * 3)  # the values, not only the names


@pytest.mark.parametrize("damage", ["truncated outputs", "garbage outputs", "truncated manifest", "wrong length"])
def test_corrupt_entry_is_rebuilt_and_logged_with_its_path(setup, damage, caplog):
    cache, model, args, calls = setup
    first = cache.get_or_extract(model, "id_test", **args)
    entry = cache.path("blobs", "test", "default")
    outputs, manifest = entry / "outputs.pt", entry / "manifest.json"
    if damage == "truncated outputs":
        outputs.write_bytes(outputs.read_bytes()[: outputs.stat().st_size // 2])
    elif damage == "garbage outputs":
        outputs.write_bytes(b"\x00not a torch file" * 10)
    elif damage == "truncated manifest":
        manifest.write_text(manifest.read_text()[:40])
    else:  # a valid file whose tensors do not match the manifest (e.g. another entry copied over it)
        torch.save({**torch.load(outputs, weights_only=True), "logits": first.logits[:10]}, outputs)
    with caplog.at_level("WARNING"):
        again = cache.get_or_extract(model, "id_test", **args)
    assert len(calls) == 2, "the corrupt entry was not rebuilt"
    assert str(entry) in caplog.text and "corrupt" in caplog.text
    assert torch.equal(again.logits, first.logits) and torch.equal(again.features, first.features)
    third = cache.get_or_extract(model, "id_test", **args)  # the rebuilt entry is a normal hit
    assert len(calls) == 2 and torch.equal(third.logits, first.logits)
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "outputs.pt"]


def _mnist_module(root, overrides=()):
    from ood_lightning.data.datamodule import OODDataModule
    from tests.conftest import compose_cfg

    cfg = compose_cfg("train", ["data=mnist", f"data.root={root}", "data.val_size=20", "ood=none", *overrides],
                      root / "run")
    dm = OODDataModule(cfg.data, cfg.ood)
    dm.setup("fit")
    return dm


def test_cache_key_follows_the_data_itself_not_only_its_name(tmp_path):
    """The same dataset name and config at another root: the key changes exactly for the split whose
    images changed (test images inverted); identical copies share every key."""
    from tests.tiny_data import write_mnist_raw

    for name, invert in (("a", False), ("copy", False), ("inverted", True)):
        write_mnist_raw(tmp_path / name, invert_test=invert)
    a, copy_, inv = (_mnist_module(tmp_path / n) for n in ("a", "copy", "inverted"))
    for split in ("id_train", "id_val", "id_test"):
        assert a.cache_key(split) == copy_.cache_key(split), split
    assert a.cache_key("id_train") == inv.cache_key("id_train") and a.cache_key("id_val") == inv.cache_key("id_val")
    assert a.cache_key("id_test") != inv.cache_key("id_test")
    # one changed pixel is enough
    (tmp_path / "a" / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(
        bytes(b ^ (i == 16 + 28 * 14) for i, b in enumerate((tmp_path / "a" / "MNIST/raw/t10k-images-idx3-ubyte")
                                                          .read_bytes())))
    assert _mnist_module(tmp_path / "a").cache_key("id_test") != copy_.cache_key("id_test")


@pytest.mark.slow
def test_posthoc_run_on_changed_data_does_not_reuse_cached_features(tmp_path):
    """After a post-hoc run on one copy of a dataset, a run with ``data.root=`` at a
    copy whose test images are inverted must give what an uncached run on that copy gives."""
    from ood_lightning.run.runs import train
    from tests.conftest import compose_cfg
    from tests.tiny_data import write_mnist_raw

    write_mnist_raw(tmp_path / "orig")
    write_mnist_raw(tmp_path / "inverted", invert_test=True)
    base = ["data=mnist", "data.val_size=20", "ood=noise", "ood.gaussian.n=50", "ood.uniform.n=50",
            "~ood.rademacher", "~ood.blobs", "backbone=cnn", "backbone.widths=[8,16]", "backbone.feature_dim=16",
            "trainer=cpu", "debug=fast", "logger=none", "detectors=fast", "data.batch_size=32"]
    train(compose_cfg("train", [*base, f"data.root={tmp_path / 'orig'}"], tmp_path / "clf"))
    ckpt = tmp_path / "clf" / "checkpoints" / "last.ckpt"
    posthoc = [*base, "method=posthoc", f"backbone.checkpoint={ckpt}", f"paths.cache_dir={tmp_path / 'cache'}"]
    train(compose_cfg("train", [*posthoc, f"data.root={tmp_path / 'orig'}"], tmp_path / "p_orig"))
    cached = train(compose_cfg("train", [*posthoc, f"data.root={tmp_path / 'inverted'}"], tmp_path / "p_inv"))
    truth = train(compose_cfg("train", [*posthoc, f"data.root={tmp_path / 'inverted'}",
                                        "evaluation.feature_cache=false"], tmp_path / "p_truth"))
    orig = json.loads((tmp_path / "p_orig" / "metrics.json").read_text())
    # the inversion changes the answer (so a stale hit would show), and the cached run gives the true one
    assert orig["results"]["msp"]["gaussian"] != truth["results"]["msp"]["gaussian"]
    assert cached["results"] == truth["results"] and cached["accuracy"] == truth["accuracy"]
    # the training split is the same in both copies: its fits are served from the fit cache (same
    # numbers as the refit of the run without caches, above); that run has no fit cache
    meta = {n: json.loads((tmp_path / n / "metrics.json").read_text())["fit_cache"] for n in ("p_orig", "p_inv", "p_truth")}
    assert meta["p_orig"]["sources"] == {"mahalanobis": "fitted"} and meta["p_truth"] is None
    assert meta["p_inv"] == {"hits": 1, "fitted": 0, "sources": {"mahalanobis": "cache"}}
