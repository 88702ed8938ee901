"""Data: packs decode like PIL and are cached; real datasets have their known sizes and
statistics; class splits, shape conversion and batched transforms do what they say."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ood_lightning.core.errors import ConfigError, DatasetNotFoundError
from ood_lightning.data import packs
from ood_lightning.data.datamodule import OODDataModule, TensorData
from ood_lightning.data.registry import ArrayData, load_dataset, select_classes
from ood_lightning.data.transforms import Preprocess, match_shape, random_crop, random_hflip
from tests.conftest import SHARED_DATA, compose_cfg, needs_shared
from tests.tiny_data import write_pack


def test_pack_decodes_like_pil_and_is_cached(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    blobs = write_pack(tmp_path / "toy-test.npz", images, np.array([0, 1, 0, 1, 0, 1]))
    packs.load_pack.cache_clear()
    pack = packs.load_pack(str(tmp_path / "toy-test.npz"), str(tmp_path / "cache"))
    expected = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in blobs]).transpose(0, 3, 1, 2)
    assert pack.images.shape == (6, 3, 8, 8) and pack.images.dtype == np.uint8
    np.testing.assert_array_equal(pack.images, expected)
    assert pack.classes == ("a", "b") and pack.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert len(list((tmp_path / "cache").glob("toy-test-*.npy"))) == 1
    # a second process (cleared in-memory cache) must read the .npy and never decode again
    packs.load_pack.cache_clear()
    monkeypatch.setattr(packs, "_decode", lambda *a: pytest.fail("decoded twice"))
    again = packs.load_pack(str(tmp_path / "toy-test.npz"), str(tmp_path / "cache"))
    np.testing.assert_array_equal(again.images, expected)


def test_an_altered_copy_with_the_same_size_and_mtime_never_reuses_decoded_pixels(tmp_path):
    """What ``cp -p`` / ``rsync -a`` / tar give: another data.root holds a pack of the same name, size
    and mtime with other images. It must decode its own pixels (as an uncached load does), and a pack
    rewritten in place the same way must too."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    original, copy = tmp_path / "a" / "toy-test.npz", tmp_path / "b" / "toy-test.npz"
    original.parent.mkdir()
    copy.parent.mkdir()
    write_pack(original, images, np.arange(6) % 2)
    write_pack(copy, images[::-1], np.arange(6) % 2)  # the same JPEGs in another order: the same byte count
    assert copy.stat().st_size == original.stat().st_size
    os.utime(copy, ns=(original.stat().st_atime_ns, original.stat().st_mtime_ns))
    cache = tmp_path / "cache"
    packs.load_pack.cache_clear()
    first = packs.load_pack(str(original), str(cache))
    packs.load_pack.cache_clear()
    altered = packs.load_pack(str(copy), str(cache))
    packs.load_pack.cache_clear()
    uncached = packs.load_pack(str(copy), None)
    np.testing.assert_array_equal(altered.images, uncached.images)
    assert not np.array_equal(altered.images, first.images)
    # the copy moved over the original's path, keeping size and mtime (cp -p over it: the same inode)
    stat = original.stat()
    original.write_bytes(copy.read_bytes())
    os.utime(original, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (original.stat().st_size, original.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    packs.load_pack.cache_clear()
    np.testing.assert_array_equal(packs.load_pack(str(original), str(cache)).images, uncached.images)


@needs_shared("cifar10-test.npz")
def test_cifar10_test_pack_matches_official_statistics(tmp_path):
    data = load_dataset("cifar10", "test", root=SHARED_DATA, cache_dir=tmp_path)
    assert tuple(data.images.shape) == (10000, 3, 32, 32) and data.images.dtype == torch.uint8
    assert torch.bincount(data.labels).tolist() == [1000] * 10
    assert data.classes[0] == "airplane" and data.classes[9] == "truck"
    means = data.images.float().mean((0, 2, 3)) / 255
    # official CIFAR-10 test-set channel means (the pack's README: equal to 3 decimals)
    np.testing.assert_allclose(means.numpy(), [0.4942, 0.4851, 0.4504], atol=1.5e-3)


@needs_shared("MNIST/raw/t10k-images-idx3-ubyte")
def test_mnist_test_has_the_official_label_counts():
    data = load_dataset("mnist", "test", root=SHARED_DATA)
    assert tuple(data.images.shape) == (10000, 1, 28, 28)
    assert torch.bincount(data.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs_shared("tinyimagenet-crop.npz")
def test_tinyimagenet_sets_are_unlabelled_rgb32(tmp_path):
    for name in ("tinyimagenet_crop", "tinyimagenet_resize"):
        data = load_dataset(name, root=SHARED_DATA, cache_dir=tmp_path)
        assert tuple(data.images.shape) == (10000, 3, 32, 32)
        assert (data.labels == -1).all()


@pytest.mark.parametrize("name", ["cifar10", "mnist", "tinyimagenet_crop", "textures"])
def test_missing_dataset_says_where_it_looked_and_what_to_pass(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match=rf"{name}.*not found: looked for {tmp_path}.*data.root="):
        load_dataset(name, "test", root=tmp_path)


def test_unknown_dataset_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown dataset 'cifar11'; available: .*cifar10"):
        load_dataset("cifar11")


def test_select_classes_relabels_in_the_given_order():
    data = ArrayData(torch.arange(10)[:, None], torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4]), tuple("abcde"))
    out = select_classes(data, [3, 1], relabel=True)
    assert out.images[:, 0].tolist() == [1, 3, 6, 8]
    assert out.labels.tolist() == [1, 0, 1, 0] and out.classes == ("d", "b")


def test_match_shape_converts_grey_to_rgb32_only_when_allowed():
    grey = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with pytest.raises(ConfigError, match=r"'mnist' has samples of shape \(1, 28, 28\).*ood.mnist.convert=true"):
        match_shape(grey, (3, 32, 32), "mnist", convert=False)
    rgb = match_shape(grey, (3, 32, 32), "mnist", convert=True)
    assert rgb.shape == (4, 3, 32, 32) and rgb.dtype == torch.uint8
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 1], rgb[:, 2])
    # a constant image stays constant through the resize
    flat = torch.full((1, 1, 28, 28), 77, dtype=torch.uint8)
    assert (match_shape(flat, (3, 32, 32), "m", True) == 77).all()


def test_shape_error_names_an_override_hydra_accepts(tmp_path):
    """Where the OOD set's config has no convert key, the suggested override needs Hydra's '+'."""
    grey = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ConfigError, match=r"pass \+ood\.tin_crop\.convert=true") as err:
        match_shape(grey, (3, 32, 32), "tin_crop", convert=None)
    override = str(err.value).split("pass ")[1].split(" ")[0]
    cfg = compose_cfg("train", ["ood=odin", override], tmp_path)
    assert cfg.ood.tin_crop.convert is True


def test_preprocess_normalises_exactly_and_augments_only_when_training():
    x = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    pre = Preprocess(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.5], crop_padding=2, hflip=True)
    expected = (x.float() / 255 - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) / torch.tensor([0.2, 0.25, 0.5])[:, None, None]
    torch.testing.assert_close(pre(x, train=False), expected)
    torch.manual_seed(0)
    assert not torch.allclose(pre(x, train=True), expected)


def test_dequantisation_stays_within_each_pixels_bin():
    x = torch.randint(0, 256, (4, 1, 5, 5), dtype=torch.uint8)
    out = Preprocess(dequantize=True)(x, train=True)
    assert ((out * 256 - x.float()) >= 0).all() and ((out * 256 - x.float()) < 1).all()


def test_random_crop_is_a_window_of_the_padded_image_and_flip_mirrors():
    torch.manual_seed(1)
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5) + 1
    out = random_crop(x, padding=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    # 64 images with no mirror symmetry: each comes back either unchanged or mirrored left-right,
    # and with p = 1/2 per image both must occur (Binomial(64, 1/2) outside [16, 48]: p < 1e-4).
    many = torch.arange(64 * 1 * 5 * 5, dtype=torch.float32).reshape(64, 1, 5, 5) + 1
    flipped = random_hflip(many)
    mirrored = torch.flip(many, dims=[-1])
    was_flipped = []
    for i in range(64):
        same, mirror = torch.equal(flipped[i], many[i]), torch.equal(flipped[i], mirrored[i])
        assert same != mirror, i
        was_flipped.append(mirror)
    assert 16 <= sum(was_flipped) <= 48, sum(was_flipped)


def test_batched_dataset_fetch_equals_per_sample_indexing():
    data = ArrayData(torch.randn(50, 3), torch.arange(50))
    loader = torch.utils.data.DataLoader(TensorData(data), batch_size=16, shuffle=False,
                                         collate_fn=lambda b: b)
    x, y = next(iter(loader))
    assert torch.equal(x, data.images[:16]) and torch.equal(y, torch.arange(16))


def _toy_module(**data_overrides) -> OODDataModule:
    data = {"name": "rings", "root": ".", "n_train": 600, "n_test": 200, "val_size": 100, "batch_size": 32,
            "known_classes": None, "split_seed": 0, "mean": None, "std": None, "kwargs": {"num_rings": 3}}
    data.update(data_overrides)
    return OODDataModule(data, {})


def test_datamodule_splits_are_disjoint_and_deterministic():
    a, b = _toy_module(), _toy_module()
    a.setup(), b.setup()
    assert len(a.train_set) == 500 and len(a.val_set) == 100 and len(a.test_set) == 200
    assert a.num_classes == 3 and a.sample_shape == (2,)
    assert torch.equal(a.val_set.images, b.val_set.images)
    train_rows = {tuple(r.tolist()) for r in a.train_set.images}
    assert not any(tuple(r.tolist()) in train_rows for r in a.val_set.images)
    assert not any(tuple(r.tolist()) in train_rows for r in a.test_set.images)


def test_datamodule_known_classes_and_heldout_ood():
    dm = OODDataModule({"name": "rings", "root": ".", "n_train": 600, "n_test": 300, "val_size": 60,
                        "batch_size": 32, "known_classes": [0, 2], "kwargs": {"num_rings": 3}},
                       {"heldout": {"dataset": "rings", "classes": "unknown", "n": 300, "num_rings": 3}})
    dm.setup()
    assert dm.num_classes == 2 and set(dm.train_set.labels.tolist()) == {0, 1}
    held = dm.ood_sets["heldout"]
    # every held-out point lies on the middle ring (radius 2), the class left out
    radii = held.images.norm(dim=1)
    assert len(held) == 100 and (radii - 2).abs().max() < 0.5


def test_limit_ood_caps_every_ood_set_unless_the_set_has_its_own_limit():
    base = {"name": "stripes", "root": ".", "n_train": 100, "n_test": 50, "val_size": 20, "batch_size": 16}
    sets = {"a": {"dataset": "gaussian_noise", "n": 40, "shape": [1, 9, 9]},
            "b": {"dataset": "uniform_noise", "n": 40, "shape": [1, 9, 9], "limit": 30}}
    full = OODDataModule(base, sets)
    full.setup()
    capped = OODDataModule({**base, "limit_ood": 12}, sets)
    capped.setup()
    assert len(full.ood_sets["a"]) == 40 and len(capped.ood_sets["a"]) == 12
    assert len(full.ood_sets["b"]) == len(capped.ood_sets["b"]) == 30
    # the cap keeps a subset of the same samples, and the feature cache tells the two apart
    rows = {tuple(r) for r in full.ood_sets["a"].images.flatten(1).tolist()}
    assert {tuple(r) for r in capped.ood_sets["a"].images.flatten(1).tolist()} <= rows
    assert full.cache_key("a") != capped.cache_key("a")


def test_empty_class_split_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"known_classes=\[7\] leaves no train samples"):
        _toy_module(known_classes=[7]).setup()


def test_ood_set_of_another_shape_names_the_fix():
    dm = OODDataModule({"name": "stripes", "root": ".", "n_train": 100, "n_test": 50, "val_size": 20, "batch_size": 16},
                       {"noise": {"dataset": "gaussian_noise", "n": 10, "shape": [3, 32, 32]}})
    with pytest.raises(ConfigError, match=r"ood.noise.convert=true"):
        dm.setup()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong length", "not uint8 images"])
def test_corrupt_decoded_pack_cache_is_rebuilt_and_logged_with_its_path(tmp_path, damage, caplog):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    write_pack(tmp_path / "toy-test.npz", images, np.array([0, 1, 0, 1, 0, 1]))
    packs.load_pack.cache_clear()
    first = packs.load_pack(str(tmp_path / "toy-test.npz"), str(tmp_path / "cache"))
    (cache,) = (tmp_path / "cache").glob("toy-test-*.npy")
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:200])
    elif damage == "garbage":
        cache.write_bytes(b"\x93NUMPY garbage" * 4)
    elif damage == "wrong length":  # e.g. the cache of another version of the pack
        np.save(cache, first.images[:4])
    else:
        np.save(cache, first.images[0, 0].astype(np.float32))
    packs.load_pack.cache_clear()
    with caplog.at_level("WARNING"):
        again = packs.load_pack(str(tmp_path / "toy-test.npz"), str(tmp_path / "cache"))
    np.testing.assert_array_equal(again.images, first.images)
    assert str(cache) in caplog.text and "corrupt" in caplog.text
    packs.load_pack.cache_clear()
    np.testing.assert_array_equal(np.load(cache), first.images)  # rebuilt in place
    assert [p.name for p in (tmp_path / "cache").glob("*.npy")] == [cache.name]


def test_data_keys_have_one_schema_with_defaults_and_typos_are_named(tmp_path):
    from ood_lightning.data.schema import DataConfig, data_config
    from tests.conftest import compose_cfg

    filled = data_config({"name": "stripes", "root": "."})
    assert filled["batch_size"] == DataConfig.batch_size and filled["augment"] == {"crop_padding": 0, "hflip": False,
                                                                                   "crop_padding_mode": "zeros"}
    with pytest.raises(ConfigError, match=r"unknown key data.limit_tran; did you mean data.limit_train\?"):
        OODDataModule({"name": "stripes", "root": ".", "limit_tran": 5})
    with pytest.raises(Exception, match="limit_tran"):  # at composition, before anything runs
        compose_cfg("train", ["data.limit_tran=5"], tmp_path)
    for name in ("cifar10", "mnist6", "moons", "stripes", "svhn"):  # every data file extends the schema
        cfg = compose_cfg("train", [f"data={name}"], tmp_path)
        assert set(cfg.data) == set(DataConfig.__dataclass_fields__), name
