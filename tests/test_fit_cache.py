"""The fit cache: a served fit scores exactly as the fresh one; any change of what the fit depends on
(config, fit data, code) misses; a damaged or foreign entry is refused with a warning, never unpickled."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_lightning.detectors import LSGM, Mahalanobis, MahalanobisTuned, ViM
from ood_lightning.detectors.knn import KNN
from ood_lightning.detectors.msp import MSP
from ood_lightning.methods.lde import LatentFlowDetector
from ood_lightning.scoring import fit_cache as fc
from ood_lightning.scoring.api import FitData, Outputs, Scorer
from ood_lightning.scoring.fit_cache import FitCache, fit_data_identity, fit_key


class TinyNet(nn.Module):
    """A FeatureModel: two named blocks and a linear head on 4-d inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        b1 = torch.tanh(self.fc1(x))
        return {"block1": b1, "penultimate": torch.tanh(self.fc2(b1))}

    def classify(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.forward_features(x)["penultimate"])


def outputs_of(model: TinyNet, x: Tensor, labels: Tensor | None = None) -> Outputs:
    with torch.no_grad():
        feats = model.forward_features(x)
        return Outputs(model.classify(feats["penultimate"]), feats["penultimate"], feats, labels)


@pytest.fixture(scope="module")
def world():
    model = TinyNet()
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(90) % 3
    x = torch.randn(90, 4, generator=g) + 2.0 * F.one_hot(labels, 4).float()
    train = outputs_of(model, x, labels)
    test = outputs_of(model, torch.randn(40, 4, generator=g) * 2, None)
    data = FitData(train=train, val_inputs=torch.randn(12, 4, generator=g))
    return model, data, test, torch.randn(16, 4, generator=g)


#: every class that declares a cacheable fit, in the settings the presets use (small)
CACHED = {
    "lsgm": lambda: LSGM(n_components=3, mixture="dirichlet", max_iter=20, seed=1),
    "lsgm_gmm_pca_every_layer": lambda: LSGM(n_components=2, mixture="gmm", max_iter=10, pca_dim=3,
                                             mixture_weights="every_layer", seed=0),
    "gmm_per_layer": lambda: LSGM(n_components=3, mixture="gmm", max_iter=10, joint=False),
    "lde_glow": lambda: LatentFlowDetector(flow="glow", n_blocks=2, hidden=8, batch_size=16, seed=3, device="cpu"),
    "lde_realnvp_pca": lambda: LatentFlowDetector(flow="realnvp", n_blocks=2, hidden=8, batch_size=16, pca_dim=3,
                                                  normalize="none", device="cpu"),
    "mahalanobis_all": lambda: Mahalanobis(layers="all"),
    "mahalanobis_eps_search": lambda: Mahalanobis(layers="all", epsilons=[0.0, 0.01, 0.05], batch_size=8),
    "vim": lambda: ViM(dim=2),
}


def fresh_and_served(name, world, tmp_path):
    model, data, _, _ = world
    fitted = CACHED[name]().fit(model, data)
    cache = FitCache(tmp_path)
    key, ingredients = fit_key(name, fitted, {"name": name}, fit_data_identity(data, "model-a"))
    cache.store(name, key, fitted, ingredients)
    served = CACHED[name]()
    fit_calls = []
    served.fit = lambda *a: fit_calls.append(a)  # a hit must not fit
    assert cache.load(name, key, served) and not fit_calls
    return fitted, served


@pytest.mark.parametrize("name", sorted(CACHED))
def test_a_served_fit_scores_exactly_as_the_fresh_one(name, world, tmp_path):
    model, _, test, inputs = world
    fitted, served = fresh_and_served(name, world, tmp_path)
    assert served.per_batch == fitted.per_batch and served.selected() == fitted.selected()
    if fitted.per_batch:  # an ε search chose ε > 0: scores come from the inputs
        assert torch.equal(served.score_batch(model, inputs), fitted.score_batch(model, inputs))
    else:
        a, b = fitted.score(model, test), served.score(model, test)
        assert torch.equal(a, b), (a - b).abs().max()


def test_the_search_chose_a_perturbation_so_the_per_batch_path_is_covered(world, tmp_path):
    fitted, served = fresh_and_served("mahalanobis_eps_search", world, tmp_path)
    assert fitted.epsilon > 0 and served.epsilon == fitted.epsilon and served.per_batch
    assert served.search == fitted.search and len(fitted.search) == 3


def test_cheap_fits_and_ood_tuned_scorers_declare_no_cacheable_fit():
    """Documented choice: MSP/KNN (trivial fits) and MahalanobisTuned (refitted per OOD set) stay uncached."""
    assert not MSP.fit_cacheable and not KNN.fit_cacheable and not MahalanobisTuned.fit_cacheable
    assert not Scorer.fit_cacheable
    with pytest.raises(NotImplementedError, match="fit_cacheable"):
        MSP().fit_state()
    assert all(type(make()).fit_cacheable for make in CACHED.values())


def key_of(world, config=None, data=None, fingerprint="model-a", scorer=None):
    _, base, _, _ = world
    return fit_key("lsgm", scorer or LSGM(), config or {"n_components": 3, "seed": 1},
                   fit_data_identity(data or base, fingerprint))[0]


def test_every_ingredient_of_the_key_changes_it(world):
    model, data, _, _ = world
    base = key_of(world)
    assert key_of(world) == base  # deterministic
    assert key_of(world, config={"n_components": 3, "seed": 2}) != base  # a seed
    assert key_of(world, config={"n_components": 4, "seed": 1}) != base  # a value
    nudged = data.train.layers["block1"].clone()
    nudged[0, 0] += 1e-6  # one feature of one fit input
    changed = Outputs(data.train.logits, data.train.features, {**data.train.layers, "block1": nudged},
                      data.train.labels)
    assert key_of(world, data=FitData(train=changed, val_inputs=data.val_inputs)) != base
    assert key_of(world, data=FitData(train=data.train.subset(torch.arange(89)), val_inputs=data.val_inputs)) != base
    relabelled = Outputs(data.train.logits, data.train.features, data.train.layers, data.train.labels.roll(1))
    assert key_of(world, data=FitData(train=relabelled, val_inputs=data.val_inputs)) != base
    assert key_of(world, data=FitData(train=data.train, val_inputs=data.val_inputs + 1)) != base  # ε search data
    assert key_of(world, fingerprint="model-b") != base
    assert key_of(world, scorer=Mahalanobis()) != base  # another class


def test_the_code_identity_follows_every_imported_module_source(tmp_path, monkeypatch):
    """A fake package: a.py imports b inside a function; editing b (not a) changes a's code digest."""
    pkg = tmp_path / "ood_lightning"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from ood_lightning.sub import b\n    return b.X\n")
    (pkg / "sub" / "b.py").write_text("X = 1\n")
    (pkg / "c.py").write_text("Y = 1\n")
    (pkg / "d.py").write_text("import ood_lightning\nfrom ood_lightning import c\n")
    monkeypatch.setattr(fc, "_PACKAGE_ROOT", pkg)
    fc._closure.cache_clear()
    try:
        first = fc._closure(("ood_lightning.a",))
        assert [m for m, _ in first] == ["ood_lightning.a", "ood_lightning.sub", "ood_lightning.sub.b"]
        (pkg / "c.py").write_text("Y = 2\n")  # not imported: no change
        fc._closure.cache_clear()
        assert fc._closure(("ood_lightning.a",)) == first
        (pkg / "sub" / "b.py").write_text("X = 2\n")
        fc._closure.cache_clear()
        assert fc._closure(("ood_lightning.a",)) != first
        assert [m for m, _ in fc._closure(("ood_lightning.d",))] == ["ood_lightning", "ood_lightning.c",
                                                                     "ood_lightning.d"]
    finally:
        fc._closure.cache_clear()


def test_the_real_closures_hold_the_helpers_the_fits_run():
    lsgm = fc.code_identity(LSGM())["modules"]
    assert {"ood_lightning.detectors.lsgm", "ood_lightning.detectors.torch_gmm", "ood_lightning.scoring.api"} <= set(lsgm)
    flow = fc.code_identity(LatentFlowDetector(device="cpu"), {"_target_": "ood_lightning.nn.flows.build.build_flow"})
    assert {"ood_lightning.nn.flows.coupling", "ood_lightning.nn.flows.residual"} <= set(flow["modules"])


def test_a_code_change_misses(world, tmp_path, monkeypatch):
    model, data, _, _ = world
    cache = FitCache(tmp_path)
    fitted = CACHED["vim"]().fit(model, data)
    key = fit_key("vim", fitted, {}, fit_data_identity(data, "m"))[0]
    cache.store("vim", key, fitted)
    real = fc._closure
    monkeypatch.setattr(fc, "_closure", lambda roots: (*real(roots), ("ood_lightning.detectors.vim", "edited")))
    new_key = fit_key("vim", fitted, {}, fit_data_identity(data, "m"))[0]
    assert new_key != key and not cache.load("vim", new_key, ViM(dim=2))


def stored_entry(world, tmp_path, name="vim"):
    model, data, _, _ = world
    fitted = CACHED[name]().fit(model, data)
    cache = FitCache(tmp_path)
    key = fit_key(name, fitted, {}, fit_data_identity(data, "m"))[0]
    return cache, key, cache.store(name, key, fitted), fitted


def test_a_truncated_entry_is_refused_with_a_warning_and_removed(world, tmp_path, caplog):
    cache, key, path, _ = stored_entry(world, tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    scorer = ViM(dim=2)
    with caplog.at_level(logging.WARNING, logger="ood_lightning.scoring.fit_cache"):
        assert not cache.load("vim", key, scorer)
    assert scorer.residual is None and not path.exists()
    assert any("corrupt" in r.message and str(path) in r.message for r in caplog.records)


def test_a_state_the_scorer_refuses_is_refitted(world, tmp_path, caplog):
    cache, key, path, fitted = stored_entry(world, tmp_path, "mahalanobis_all")
    entry = torch.load(path, weights_only=True)
    del entry["tensors"]["layer1/precision"]
    torch.save(entry, path)
    scorer = Mahalanobis(layers="all")
    with caplog.at_level(logging.WARNING, logger="ood_lightning.scoring.fit_cache"):
        assert not cache.load("mahalanobis_all", key, scorer)
    assert scorer.means == {} and scorer.precisions == {} and not path.exists()
    assert "layer1/precision" in caplog.text


class _HalfRestoring(ViM):
    """A scorer whose restore sets one attribute, then fails."""

    def load_fit_state(self, state) -> None:
        self.alpha = float(state["alpha"])
        raise KeyError("residual")


def test_a_restore_that_fails_halfway_leaves_the_scorer_as_it_was(world, tmp_path):
    cache, key, path, fitted = stored_entry(world, tmp_path)
    scorer = _HalfRestoring(dim=2)
    assert not cache.load("vim", key, scorer)
    assert scorer.alpha is None and scorer.residual is None


def test_an_entry_of_another_key_is_refused(world, tmp_path, caplog):
    cache, key, path, _ = stored_entry(world, tmp_path)
    other = "f" * 64
    os.replace(path, cache.path("vim", key[:16] + other[16:]))  # same short name, another full key
    with caplog.at_level(logging.WARNING, logger="ood_lightning.scoring.fit_cache"):
        assert not cache.load("vim", key[:16] + other[16:], ViM(dim=2))
    assert "holds key" in caplog.text


RAN: list[str] = []


def _ran(what: str) -> None:
    RAN.append(what)


class _Boom:
    """Unpickling this runs code (it calls ``_ran``)."""

    def __reduce__(self):
        return (_ran, ("unpickled",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_an_entry_is_never_unpickled(writer, world, tmp_path, caplog):
    """A file that runs code when unpickled, at an entry's path, is refused; the code never runs."""
    cache, key, path, _ = stored_entry(world, tmp_path)
    evil = {"format": fc.FORMAT, "key": key, "tensors": {}, "values": "{}", "x": _Boom()}
    if writer == "torch.save":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil))
    live = path.with_name("live-copy")
    live.write_bytes(path.read_bytes())
    with caplog.at_level(logging.WARNING, logger="ood_lightning.scoring.fit_cache"):
        assert not cache.load("vim", key, ViM(dim=2))
    assert RAN == [] and "corrupt" in caplog.text and not path.exists()
    # the file was live: unpickling it does run the code
    torch.load(live, weights_only=False) if writer == "torch.save" else pickle.loads(live.read_bytes())
    assert RAN == ["unpickled"]
    RAN.clear()


def test_a_crash_during_the_write_leaves_no_entry(world, tmp_path, monkeypatch):
    model, data, _, _ = world
    fitted = CACHED["vim"]().fit(model, data)
    cache = FitCache(tmp_path)

    def dies(obj, f):
        open(f, "wb").write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        cache.store("vim", "a" * 64, fitted)
    assert list(tmp_path.iterdir()) == []


def test_the_evaluation_loop_serves_fits_from_the_cache_on_a_rerun(tmp_path, caplog, monkeypatch):
    """score_all twice with a fit cache: the second serves LSGM and Mahalanobis (their fit is never
    called) with the same scores, logs it per scorer, and counts it; a changed config refits."""
    from ood_lightning.scoring.loop import score_all
    from tests.conftest import TINY, untrained_run

    _, dm, model = untrained_run([*TINY, "data.n_train=150", "data.val_size=30", "data.n_test=40",
                                  "ood.diagonal.n=30"], tmp_path)
    cache = FitCache(tmp_path / "fits")

    def detectors():
        return {"msp": MSP(), "lsgm": LSGM(n_components=2, mixture="gmm", max_iter=5), "maha": Mahalanobis(),
                "knn": KNN(k=3)}

    configs = {"msp": {}, "lsgm": {"n_components": 2}, "maha": {}, "knn": {"k": 3}}
    first = score_all(model, dm, detectors(), "cpu", fit_limit=100, fit_cache=cache, configs=configs)
    assert first.fit_cache == {"lsgm": "fitted", "maha": "fitted", "knn": "not cacheable"}  # MSP needs no fit
    monkeypatch.setattr(LSGM, "fit", lambda *a: pytest.fail("LSGM refitted on a hit"))
    monkeypatch.setattr(Mahalanobis, "fit", lambda *a: pytest.fail("Mahalanobis refitted on a hit"))
    with caplog.at_level(logging.INFO, logger="ood_lightning.scoring.loop"):
        second = score_all(model, dm, detectors(), "cpu", fit_limit=100, fit_cache=cache, configs=configs)
    assert second.fit_cache == {"lsgm": "cache", "maha": "cache", "knn": "not cacheable"}
    assert all(torch.equal(first.scores[k], second.scores[k]) for k in first.scores)
    assert "fit lsgm: from the fit cache (" in caplog.text and "fit cache: 2 of 2 cacheable fits served" in caplog.text
    with pytest.raises(pytest.fail.Exception, match="LSGM refitted"):  # another config: not served
        score_all(model, dm, detectors(), "cpu", fit_limit=100, fit_cache=cache,
                  configs={**configs, "lsgm": {"n_components": 3}})


class _Method:
    """What scorer_configs / fit_cache read of a model."""

    trains_backbone = False

    def __init__(self, own: dict) -> None:
        self.own = own

    def scorers(self) -> dict:
        return self.own


def test_each_scorer_is_keyed_on_its_own_resolved_config_node(tmp_path):
    """posthoc_cifar10: LSGM by its method.scorers node (seed resolved), LDE by detectors.lde (its flow
    too); a method without a scorers node keys its own scores on the whole method; fit_cache=false
    and runs without a feature cache get no fit cache."""
    from ood_lightning.run.build import fit_cache, scorer_configs
    from tests.conftest import compose_cfg

    over = ["experiment=posthoc_cifar10", "backbone.checkpoint=/nowhere/run/checkpoints/last.ckpt",
            f"paths.cache_dir={tmp_path}"]
    cfg = compose_cfg("train", [*over, "seed=7"], tmp_path / "run")
    model = _Method({"lsgm": None, "gmm_per_layer": None})
    configs = scorer_configs(cfg, model)
    assert configs["lsgm"]["method"] == "ood_lightning.methods.PostHoc"
    assert configs["lsgm"]["scorer"]["seed"] == 7 and configs["lsgm"]["scorer"]["_target_"] == "ood_lightning.detectors.LSGM"
    assert configs["gmm_per_layer"]["scorer"]["joint"] is False
    assert configs["lde"]["flow"]["name"] == "glow" and configs["lde"]["seed"] == 7
    assert configs["lde_unnormalized"]["flow"] == configs["lde"]["flow"]  # the interpolation, resolved
    assert configs["mahalanobis_ensemble"]["epsilons"] == [0.0025, 0.005, 0.01, 0.02, 0.04, 0.08]
    assert fit_cache(cfg, model).root.parent == tmp_path / "fits"
    other = compose_cfg("train", [*over, "method=lde"], tmp_path / "run2")
    whole = scorer_configs(other, _Method({"lde_bpd": None}))["lde_bpd"]
    assert set(whole) == {"method"} and "flow" in whole["method"]
    off = compose_cfg("train", [*over, "evaluation.fit_cache=false"], tmp_path / "run3")
    assert fit_cache(off, model) is None
    no_features = compose_cfg("train", [*over, "evaluation.feature_cache=false"], tmp_path / "run4")
    assert fit_cache(no_features, model) is None
