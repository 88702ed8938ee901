"""The thesis' latent SVM probe (Table 3.1: "Classification accuracy of a linear SVM trained to separate
different learned latent codes. We set the ID dataset as positive.") reports *held-out* accuracy.

Truths: the held-out rows the probe returns are checked against the inputs by hand (disjoint from
the rows it trained on, the stated fraction of each set), an independent scikit-learn pipeline
refitted on exactly the complementary rows reproduces its accuracies, and on two sets drawn from
one distribution in many dimensions (which a linear SVM can memorise) the held-out accuracy stays
near chance while the training half's would be perfect.
"""

from __future__ import annotations

import numpy as np
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from ood_lightning.methods.vae.latent_probe import fit_latent_probe


def _rows(a: np.ndarray) -> set[tuple[float, ...]]:
    return {tuple(r) for r in np.round(a, 12)}


def test_probe_accuracies_are_those_of_the_held_out_half() -> None:
    rng = np.random.default_rng(0)
    id_z = rng.normal(0.6, 1.0, size=(200, 5))
    ood_z = rng.normal(-0.6, 1.0, size=(200, 5))
    probe = fit_latent_probe(id_z, ood_z, test_size=0.5, seed=3)
    held_id, held_ood = _rows(probe.test_latents_id), _rows(probe.test_latents_ood)
    assert len(held_id) == len(held_ood) == 100 and probe.n_test == 200 and probe.n_train == 200
    assert held_id <= _rows(id_z) and held_ood <= _rows(ood_z)
    # the complement, by hand: every input row not held out is a training row
    train_id = np.array([r for r in id_z if tuple(np.round(r, 12)) not in held_id])
    train_ood = np.array([r for r in ood_z if tuple(np.round(r, 12)) not in held_ood])
    assert len(train_id) == len(train_ood) == 100
    clf = make_pipeline(StandardScaler(), LinearSVC(C=1.0, max_iter=5000, random_state=3))
    clf.fit(np.r_[train_id, train_ood], np.r_[np.ones(100), np.zeros(100)])
    assert probe.positive_accuracy == (clf.predict(probe.test_latents_id) == 1).mean()
    assert probe.negative_accuracy == (clf.predict(probe.test_latents_ood) == 0).mean()
    assert 0.6 < probe.accuracy < 1.0  # overlapping Gaussians: neither chance nor perfect


def test_probe_on_indistinguishable_sets_is_at_chance_on_held_out_data() -> None:
    """ID and "OOD" from one distribution in 60 dimensions, 40 rows each: a linear SVM separates its
    training half perfectly (checked), so only a held-out evaluation reports chance."""
    rng = np.random.default_rng(1)
    id_z, ood_z = rng.normal(size=(40, 60)), rng.normal(size=(40, 60))
    probe = fit_latent_probe(id_z, ood_z, test_size=0.5, seed=0)
    train = np.r_[id_z, ood_z]
    memorised = make_pipeline(StandardScaler(), LinearSVC(max_iter=5000, random_state=0)).fit(
        train, np.r_[np.ones(40), np.zeros(40)])
    assert (memorised.predict(train) == np.r_[np.ones(40), np.zeros(40)]).mean() == 1.0
    assert probe.accuracy < 0.75
