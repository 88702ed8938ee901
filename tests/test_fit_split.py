"""Fit data per detector: a scorer that declares ``fit_augmented`` (LDE, §6.2 of its paper) fits
on latents of augmented training images while the others of the same run fit on the plain split;
the feature cache serves both; ``experiment=posthoc_cifar10`` resolves to the paper's choice."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from ood_lightning.detectors import Mahalanobis
from ood_lightning.methods.lde import LatentFlowDetector
from ood_lightning.scoring import loop
from ood_lightning.scoring.api import FitData, Scorer
from ood_lightning.scoring.feature_cache import FeatureCache
from tests.conftest import TINY, compose_cfg, untrained_run

PAD = 2
DATA = [*TINY, "data.n_train=60", "data.val_size=20", "data.n_test=20", "ood.diagonal.n=20",
        f"data.augment.crop_padding={PAD}", "data.augment.hflip=true"]


class Spy(Scorer):
    """Records the training features it was fitted on."""

    fit_cacheable = False

    def __init__(self, fit_augmented: bool | None) -> None:
        self.fit_augmented = fit_augmented
        self.seen: torch.Tensor | None = None

    def fit(self, model, data: FitData) -> Spy:
        self.seen = data.train.features.clone()
        return self

    def score(self, model, outputs):
        return torch.zeros(len(outputs))


def _every_augmentation(model, images: torch.Tensor) -> torch.Tensor:
    """Penultimate features of every crop offset x flip of each image, by brute force: [K, N, D]."""
    padded = F.pad(images.float(), (PAD,) * 4)
    h, w = images.shape[-2:]
    out = []
    with torch.no_grad():
        for dy, dx, flip in itertools.product(range(2 * PAD + 1), range(2 * PAD + 1), (False, True)):
            x = padded[..., dy:dy + h, dx:dx + w]
            out.append(model.forward_features(x.flip(-1) if flip else x)["penultimate"])
    return torch.stack(out)


def test_each_scorer_fits_on_its_declared_split_and_the_cache_serves_both(tmp_path, monkeypatch):
    _, dm, model = untrained_run(DATA, tmp_path)
    model.eval()
    scorers = {"plain": Spy(False), "augmented": Spy(True), "runs": Spy(None)}
    first = loop.score_all(model, dm, scorers, "cpu", fit_limit=None, cache=FeatureCache(tmp_path / "features"))
    images = dm.train_set.images
    with torch.no_grad():
        plain = model.forward_features(dm.preprocess(images))["penultimate"]
    torch.testing.assert_close(scorers["plain"].seen, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorers["runs"].seen, plain, atol=1e-5, rtol=1e-5)  # the run's split is plain
    # each augmented feature is one of the 50 crop/flip variants of its own image, and not all are the identity
    candidates = _every_augmentation(model, images)
    distance = (candidates - scorers["augmented"].seen[None]).abs().amax(-1).amin(0)
    assert distance.max() < 1e-4, distance.max()
    assert (scorers["augmented"].seen - plain).abs().amax(-1).gt(1e-3).sum() > len(images) // 2
    assert first.fit_splits == {"plain": False, "augmented": True, "runs": False} and first.fit_samples == len(images)
    assert {"features/id_train", "features/id_train_augmented"} <= set(first.timings)
    # a rerun reads both fit splits from the feature cache: no pass at all, the same inputs
    monkeypatch.setattr(loop, "extract", lambda *a, **k: pytest.fail("extracted again"))
    again = {"plain": Spy(False), "augmented": Spy(True)}
    loop.score_all(model, dm, again, "cpu", fit_limit=None, cache=FeatureCache(tmp_path / "features"))
    for name in again:
        assert torch.equal(again[name].seen, scorers[name].seen), name


def test_only_the_splits_asked_for_are_extracted(tmp_path):
    """Every scorer augmented: no plain pass over the training split (and the reverse)."""
    _, dm, model = untrained_run(DATA, tmp_path)
    results = loop.score_all(model, dm, {"a": Spy(True)}, "cpu", fit_limit=None)
    assert "features/id_train_augmented" in results.timings and "features/id_train" not in results.timings
    results = loop.score_all(model, dm, {"a": Spy(None)}, "cpu", fit_limit=None, fit_augmented=True)
    assert results.fit_splits == {"a": True} and results.fit_augmented


def test_lde_declares_the_papers_augmented_fit_and_the_baselines_stay_plain(tmp_path):
    assert LatentFlowDetector().fit_augmented is True and Mahalanobis().fit_augmented is None
    cfg = compose_cfg("train", ["experiment=posthoc_cifar10"], tmp_path)
    assert cfg.evaluation.fit_limit is None and cfg.evaluation.fit_augmented is False
    assert cfg.detectors.lde.fit_augmented is True and cfg.detectors.lde_unnormalized.fit_augmented is True
    lde = compose_cfg("train", ["method=lde", "data=cifar10"], tmp_path)
    assert lde.method.fit.fit_augmented is True and lde.evaluation.fit_augmented is False
