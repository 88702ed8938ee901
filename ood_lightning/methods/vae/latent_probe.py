"""Is ID vs OOD linearly separable in a VAE's latent space? A linear SVM probe.

The seed thesis (Table 3.1) trains a linear SVM on the latent means of ID and OOD inputs
and reports its accuracy on held-out ID ("positive") and OOD ("negative") inputs: if the
encoder separates the two although the likelihood does not, the failure lies in the
likelihood, not in the representation. This module fits that probe (scikit-learn's
``LinearSVC`` on standardised latents, balanced classes, a stratified held-out split),
returns the hyperplane in latent coordinates (unit normal, offset) and signed distances,
and walks latents along the normal for decoded interpolations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC


@dataclass
class ProbeResult:
    """A fitted probe. Distances are signed, in latent units: positive = ID side."""

    positive_accuracy: float  # held-out ID inputs classified ID
    negative_accuracy: float  # held-out OOD inputs classified OOD
    accuracy: float  # both held-out classes together (balanced, so their mean)
    normal: np.ndarray  # [d] unit normal of the hyperplane in latent coordinates, pointing to ID
    offset: float  # signed distance of z: z @ normal + offset
    distances_id: np.ndarray  # held-out ID
    distances_ood: np.ndarray  # held-out OOD
    test_latents_id: np.ndarray
    test_latents_ood: np.ndarray
    n_train: int
    n_test: int

    def summary(self) -> dict:
        return {"positive_accuracy": self.positive_accuracy, "negative_accuracy": self.negative_accuracy,
                "accuracy": self.accuracy, "n_train": self.n_train, "n_test": self.n_test}

    def distance(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) @ self.normal + self.offset


def fit_latent_probe(id_latents, ood_latents, test_size: float = 0.5, C: float = 1.0, max_per_set: int | None = 5000,
                     seed: int = 0, max_iter: int = 5000) -> ProbeResult:
    """Fit a linear SVM separating ID (label 1) from OOD (label 0) latent means.

    Both sets are subsampled to the same size (at most ``max_per_set``), so accuracy is not
    inflated by class imbalance; ``test_size`` of each is held out for the reported numbers.
    """
    rng = np.random.default_rng(seed)
    id_z, ood_z = np.asarray(id_latents, dtype=np.float64), np.asarray(ood_latents, dtype=np.float64)
    n = min(len(id_z), len(ood_z), max_per_set or np.inf)
    if n < 4:
        raise ValueError(f"the latent probe needs at least 4 inputs per set, got {len(id_z)} ID and {len(ood_z)} OOD")
    id_z = id_z[rng.choice(len(id_z), int(n), replace=False)]
    ood_z = ood_z[rng.choice(len(ood_z), int(n), replace=False)]
    z = np.concatenate([id_z, ood_z])
    y = np.r_[np.ones(len(id_z), dtype=int), np.zeros(len(ood_z), dtype=int)]
    z_tr, z_te, y_tr, y_te = train_test_split(z, y, test_size=test_size, stratify=y, random_state=seed)
    clf = make_pipeline(StandardScaler(), LinearSVC(C=C, max_iter=max_iter, random_state=seed))
    clf.fit(z_tr, y_tr)
    scaler, svm = clf[0], clf[1]
    # decision(z) = w . (z - m) / s + b = (w / s) . z + (b - w . m / s): back to latent coordinates
    w = svm.coef_[0] / scaler.scale_
    b = float(svm.intercept_[0] - np.dot(svm.coef_[0], scaler.mean_ / scaler.scale_))
    norm = float(np.linalg.norm(w)) or 1.0
    normal, offset = w / norm, b / norm
    pred = clf.predict(z_te)
    pos, neg = y_te == 1, y_te == 0
    dist = z_te @ normal + offset
    return ProbeResult(positive_accuracy=float((pred[pos] == 1).mean()), negative_accuracy=float((pred[neg] == 0).mean()),
                       accuracy=float((pred == y_te).mean()), normal=normal, offset=offset,
                       distances_id=dist[pos], distances_ood=dist[neg], test_latents_id=z_te[pos],
                       test_latents_ood=z_te[neg], n_train=len(y_tr), n_test=len(y_te))


def walk_along_normal(z: np.ndarray, probe: ProbeResult, distances: np.ndarray) -> np.ndarray:
    """For each latent z [N, d] and each target signed distance t [T]: z moved along the
    normal so that its distance is t, i.e. z + (t - distance(z)) * normal -> [N, T, d]."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    shift = np.asarray(distances, dtype=np.float64)[None, :] - probe.distance(z)[:, None]  # [N, T]
    return z[:, None, :] + shift[..., None] * probe.normal[None, None, :]
