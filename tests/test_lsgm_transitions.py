"""LSGM's transitions counted from a hand-built trace set, and the preset's values that carry the
paper's idea pinned against its text.

Truths: per-layer mixtures written by hand (1-D Gaussians with known means, variances and weights),
so each training input's trace (the argmax of weight × density per layer) is known before the
fit; the transition rows are then the hand-counted frequencies with the preset's stated
smoothing (one pseudo-count per row, spread over its cells). Each input's state is also
recomputed with scipy, so the hand-made list and the densities agree.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from scipy.stats import norm

from ood_lightning.detectors.lsgm import LSGM, _LayerModel
from ood_lightning.scoring.api import Outputs
from tests.conftest import compose_cfg

#: per layer: component means, standard deviations and mixture weights (1-D features)
LAYERS = {
    "block1": (np.array([-5.0, 0.0, 5.0]), np.array([1.0, 1.0, 1.0]), np.array([0.1, 0.8, 0.1])),
    "block2": (np.array([-5.0, 0.0, 5.0]), np.array([1.0, 1.0, 1.0]), np.array([0.3, 0.4, 0.3])),
}
#: the hand-built traces: (block1 value, block2 value, block1 state, block2 state). The state is the
#: component with the largest weight × density; at -2.6 on block1 the weights decide it (component 0
#: has the larger density, N(-2.6; -5, 1) > N(-2.6; 0, 1), but 0.1 x 0.0224 < 0.8 x 0.0136).
TRACES = [(-5.0, -5.0, 0, 0)] * 4 + [(-5.0, 0.1, 0, 1)] * 2 + [(0.0, 5.0, 1, 2)] * 5 + [(0.2, 0.0, 1, 1)] * 1 \
    + [(-2.6, 4.8, 1, 2)] * 3 + [(5.0, 5.1, 2, 2)] * 2 + [(4.9, -5.0, 2, 0)] * 1
#: hand-counted transitions block1 state -> block2 state
COUNTS = np.array([[4, 2, 0],
                   [0, 1, 8],
                   [1, 0, 2]], dtype=float)


def _layer_model(means: np.ndarray, stds: np.ndarray, weights: np.ndarray) -> _LayerModel:
    """A fitted layer written by hand: no standardisation, full 1x1 precision Cholesky factors 1/σ."""
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    return _LayerModel(t([0.0]), t([1.0]), None, t(np.log(weights)), t(means[:, None]),
                       t(1.0 / stds)[:, None, None], "full", None)


def _preset_lsgm(tmp_path) -> LSGM:
    return instantiate(compose_cfg("train", ["method=lsgm", "data=cifar10"], tmp_path).method.scorers.lsgm)


def _fit_hand_built(det: LSGM, monkeypatch) -> LSGM:
    monkeypatch.setattr(LSGM, "_fit_layer", lambda self, name, h, k: _layer_model(*LAYERS[name]))
    values = torch.tensor([(a, b) for a, b, _, _ in TRACES], dtype=torch.float64)
    train = Outputs(logits=torch.zeros(len(TRACES), 10), features=values[:, 1:], labels=torch.arange(len(TRACES)) % 10,
                    layers={"block1": values[:, :1], "block2": values[:, 1:]})
    return det.fit_outputs(train)


def test_hand_built_traces_are_the_states_scipy_gives() -> None:
    """The trace list above is what weight × density says (scipy), including the weight-decided point."""
    for a, b, s1, s2 in TRACES:
        for value, state, (mu, sd, w) in ((a, s1, LAYERS["block1"]), (b, s2, LAYERS["block2"])):
            assert int(np.argmax(w * norm.pdf(value, mu, sd))) == state
    assert int(np.argmax(norm.pdf(-2.6, *LAYERS["block1"][:2]))) == 0  # density alone would say 0


def test_transitions_are_the_hand_counted_frequencies_with_the_stated_smoothing(tmp_path, monkeypatch) -> None:
    """§3.3: "For the transition probabilities in transition matrices, we statistically count the
    frequencies from existing traces in in-distribution data". With the preset (hard traces; one
    pseudo-count per row spread over its k cells, docs/fidelity.md LSGM #2): A[i, j] =
    (counts[i, j] + 1/k) / (row_i + 1). The initial distribution is the first layer's mixture weights
    (Eq. 3's P(z_1), "z_i ~ Categorical(Φ_i)")."""
    det = _fit_hand_built(_preset_lsgm(tmp_path), monkeypatch)
    (a,) = det.transition_matrices
    expected = (COUNTS + 1.0 / 3) / (COUNTS.sum(1, keepdims=True) + 1.0)
    np.testing.assert_allclose(a.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(det.log_init.exp().numpy(), LAYERS["block1"][2], rtol=1e-12)


def test_the_score_is_the_forward_sum_over_every_hand_built_path(tmp_path, monkeypatch) -> None:
    """Eq. 3 / the §3.3 recursion, brute force over all 3 x 3 state paths with scipy densities:
    log Σ_{z1,z2} π(z1) N(x1 | z1) A(z1, z2) N(x2 | z2)."""
    det = _fit_hand_built(_preset_lsgm(tmp_path), monkeypatch)
    (a,) = det.transition_matrices
    pts = torch.tensor([[-5.0, -5.0], [0.0, 5.0], [-2.6, 4.8], [5.0, -5.0], [3.0, 1.0]], dtype=torch.float64)
    outputs = Outputs(logits=torch.zeros(5, 10), features=pts[:, 1:], layers={"block1": pts[:, :1], "block2": pts[:, 1:]})
    got = det.score(None, outputs).numpy()
    (m1, s1, w1), (m2, s2, _) = LAYERS["block1"], LAYERS["block2"]
    for (x1, x2), value in zip(pts.numpy(), got):
        total = sum(w1[i] * norm.pdf(x1, m1[i], s1[i]) * a[i, j].item() * norm.pdf(x2, m2[j], s2[j])
                    for i in range(3) for j in range(3))
        assert value == pytest.approx(math.log(total), rel=1e-10)


def test_lsgm_preset_carries_the_papers_choices(tmp_path) -> None:
    """Xu et al.: §3.3 "we statistically count the frequencies from existing traces" (hard traces);
    §4.2.2 "we suggest DPGMM as the default approach to learn the distributions in representation
    spaces for LSGM"; §2.3 "each cluster is subject to a multivariate Gaussian distribution" (full
    covariance); Eq. 3's P(z_1) from the first layer's mixture weights; §4.1 "we use k=50 for models on
    CIFAR-10, k=100 for models on CIFAR-100, and k=200 for the model on Tiny-ImageNet"; §4.1 "we
    select the last layer of each main block"; the smoothing is ours (paper silent), one pseudo-count
    per row."""
    s = compose_cfg("train", ["method=lsgm", "data=cifar10"], tmp_path).method.scorers.lsgm
    assert s.transitions == "hard"
    assert s.mixture == "dirichlet"
    assert s.covariance_type == "full"
    assert s.initial == "weights"
    assert s.n_components == "paper" and s.layers == "all" and instantiate(s).joint is True
    assert (s.transition_smoothing, s.smoothing_per) == (1.0, "row")
    assert s.mixture_weights == "first_layer"
