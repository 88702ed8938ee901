"""LDE's Glow checked layer by layer, and the ``method=lde`` preset's values pinned against the
paper's text (Cook, Lavoie & Waslander: §4 "Normalizing Flow Models", §3.2, §6.2, §6.3).

Truths: each layer's log|det| against ``slogdet`` of its Jacobian (``torch.func.jacrev``) at random
points with randomised parameters; each layer's inverse; the paper's numbers in its words.
"""

from __future__ import annotations

import pytest
import torch
from nflows.transforms import ActNorm, AffineCouplingTransform, LULinear
from torch import nn

from ood_lightning.nn.flows.coupling import glow
from ood_lightning.run.build import build_model
from tests.conftest import compose_cfg

pytestmark = pytest.mark.usefixtures("single_thread")

DIM = 6


def _randomised_glow(n_blocks: int = 2):
    """A Glow whose every parameter is random (its ActNorm initialised, its LU linear no longer the
    identity, its couplings' zero-initialised last layers filled), in float64."""
    torch.manual_seed(0)
    flow = glow(DIM, n_blocks=n_blocks, hidden=8).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(0.4 * torch.randn_like(p))
    for layer in flow.flow._transform._transforms:
        if isinstance(layer, ActNorm):
            layer.initialized.fill_(True)
    return flow.eval()


def _layers(flow) -> list[nn.Module]:
    return list(flow.flow._transform._transforms)


def test_glow_is_actnorm_lu_linear_coupling_per_block() -> None:
    """§4: "We use a 10 block Glow (Kingma & Dhariwal, 2018)": each Glow step is ActNorm, an invertible
    linear map (the 1x1 convolution of images, an LU-decomposed matrix for vectors), then an affine
    coupling, in that order; the couplings' halves alternate so that every coordinate is transformed."""
    layers = _layers(glow(DIM, n_blocks=3, hidden=8))
    assert [type(m) for m in layers] == [ActNorm, LULinear, AffineCouplingTransform] * 3
    couplings = [m for m in layers if isinstance(m, AffineCouplingTransform)]
    first, second = (set(c.transform_features.tolist()) for c in couplings[:2])
    assert first and second and not first & second and first | second == set(range(DIM))
    for c in couplings:
        assert set(c.identity_features.tolist()) == set(range(DIM)) - set(c.transform_features.tolist())


@pytest.mark.parametrize("kind", [ActNorm, LULinear, AffineCouplingTransform])
def test_each_glow_layer_log_det_is_its_jacobian_and_it_inverts(kind) -> None:
    """Layer by layer: log|det ∂y/∂x| returned by the layer equals slogdet of its dense Jacobian, and
    inverse(forward(x)) = x. The LU linear layer is a full matrix (mixes every coordinate), not a
    permutation or a diagonal."""
    flow = _randomised_glow()
    x = torch.randn(5, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for layer in (m for m in _layers(flow) if isinstance(m, kind)):
        y, logdet = layer(x)
        for xi, ld in zip(x, logdet):
            jac = torch.func.jacrev(lambda v, layer=layer: layer(v[None])[0][0])(xi)
            assert float(ld) == pytest.approx(float(torch.linalg.slogdet(jac).logabsdet), abs=1e-9)
            if kind is LULinear:
                assert (jac.abs() > 1e-6).sum() > 2 * DIM  # off-diagonal entries: it mixes coordinates
        back, _ = layer.inverse(y)
        torch.testing.assert_close(back, x, rtol=1e-9, atol=1e-9)
        x = y


def test_glow_log_prob_is_the_sum_of_its_layers_and_the_normal_base() -> None:
    """log p(h) = log N(f(h); 0, I) + Σ_layers log|det|: the change of variables of §2.2, from the layers."""
    flow = _randomised_glow()
    h = torch.randn(4, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    v, total = h, torch.zeros(4, dtype=torch.float64)
    for layer in _layers(flow):
        v, ld = layer(v)
        total = total + ld
    base = torch.distributions.Normal(0.0, 1.0).log_prob(v).sum(1)
    torch.testing.assert_close(flow.log_prob(h), base + total, rtol=1e-10, atol=1e-10)


# -- the preset, pinned against the paper's text --------------------------------------------------
def test_lde_preset_is_the_papers_flow_and_fit(tmp_path) -> None:
    """§4: "We use a 10 block Glow ... For flow models trained on CIFAR-10, each block is composed of two
    linear layers with dimension [512, 2048, 512] ... trained using the Adam optimizer for only a single
    epoch with a learning rate of 1e-4 for CIFAR-10"; §3.2: "We select a quantization precision of
    ε = 1/1024"; §6.3/Table 3: the headline flow runs on *normalized* latents ("normalizing the latent
    variables strongly improves OOD detection performance"), the unnormalised one is the ablation."""
    cfg = compose_cfg("train", ["method=lde", "data=cifar10", "backbone=cifar_resnet20"], tmp_path)
    model = build_model(cfg, 10, pretrained=False)
    lde, raw = model.scorers()["lde"], model.scorers()["lde_unnormalized"]
    assert (lde.normalize, raw.normalize) == ("l2", "none")
    for det in (lde, raw):
        assert (det.lr, det.epochs, det.epsilon, det.weight_decay) == (1e-4, 1, 1 / 1024, 0.0)
        assert det.pca_dim is None  # §6.1: "an unreduced latent space yields stronger OOD detection"
    flow = lde.flow_name(512)
    layers = _layers(flow)
    assert sum(isinstance(m, AffineCouplingTransform) for m in layers) == 10
    assert [type(m) for m in layers[:3]] == [ActNorm, LULinear, AffineCouplingTransform]
    net = layers[2].transform_net
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 and linears[0].out_features == 2048 and linears[1].in_features == 2048
    h = torch.randn(8, 64) * torch.linspace(0.5, 4.0, 8)[:, None]
    torch.testing.assert_close(lde.prepare(h).norm(dim=1), torch.ones(8))
    torch.testing.assert_close(raw.prepare(h), h)
    # §6.2: "latent representations obtained with dataset augmentation": each LDE flow declares its own augmented fit split
    assert lde.fit_augmented is True and raw.fit_augmented is True
