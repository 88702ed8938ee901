"""Residual flow: exact eval log-det, unbiased training estimator, invertibility, Lip(g) < 1,
a normalised density, and a density that actually learns."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from ood_lightning.core.errors import ConfigError
from ood_lightning.nn.flows import LipSwish, ResidualFlow
from ood_lightning.nn.spectral import converge_spectral_norms, spectral_norms

pytestmark = pytest.mark.usefixtures("single_thread")


def _flow(dim: int, stiff: bool = True, **kwargs) -> ResidualFlow:
    """A small random flow; ``stiff``: every Linear at its bound and steep activations, the hardest case."""
    torch.manual_seed(0)
    flow = ResidualFlow(dim, **{"n_blocks": 3, "hidden": 16, **kwargs})
    if stiff:
        with torch.no_grad():
            for m in flow.modules():
                if isinstance(m, nn.Linear):
                    m.parametrizations.weight.original.mul_(10)  # the bound scales it back to coeff
                elif isinstance(m, LipSwish):
                    m.raw_beta.fill_(4.0)
    return flow


@pytest.fixture(scope="module")
def trained() -> ResidualFlow:
    """A 4-D flow fitted to a narrow Gaussian, so each block's log-det is O(1), not ~0 as at init."""
    torch.manual_seed(0)
    flow = ResidualFlow(4, n_blocks=4, hidden=32)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(200):
        loss = -flow.log_prob(torch.randn(256, 4) * torch.tensor([0.3, 0.4, 0.5, 0.3])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return converge_spectral_norms(flow).eval()


def _true_logdet(flow: ResidualFlow, x: torch.Tensor) -> torch.Tensor:
    """log|det ∂z/∂x| of the whole flow from its full Jacobian, independently of the blocks' estimators."""
    def z_of(xi: torch.Tensor) -> torch.Tensor:
        return flow(xi.unsqueeze(0))[0][0]

    with torch.no_grad():
        jac = torch.func.vmap(torch.func.jacrev(z_of))(x)
    return torch.linalg.slogdet(jac).logabsdet


def _initialised(flow: ResidualFlow, x: torch.Tensor) -> ResidualFlow:
    """One training forward (ActNorm's data-dependent init, a power-iteration step), then eval."""
    flow.train()
    flow(x)
    return flow.eval()


@pytest.mark.parametrize(("dim", "actnorm"), [(2, False), (3, True), (6, False), (4, None)])
def test_eval_logdet_is_exact(dim: int, actnorm: bool | None, trained: ResidualFlow) -> None:
    if actnorm is None:
        flow, x = copy.deepcopy(trained).double(), torch.randn(16, dim, dtype=torch.float64) * 0.4
    else:
        flow = _initialised(_flow(dim, actnorm=actnorm), torch.randn(64, dim) * 2 + 1).double()
        x = torch.randn(16, dim, dtype=torch.float64) * 2
    with torch.no_grad():
        z, logdet = flow(x)
    torch.testing.assert_close(logdet, _true_logdet(flow, x), rtol=0, atol=1e-8)
    assert z.shape == x.shape and logdet.shape == (16,)


def test_training_estimator_is_unbiased_and_differentiable(trained: ResidualFlow) -> None:
    n_calls, reps = 100, 40
    flow = copy.deepcopy(trained).double()
    x = torch.randn(5, 4, dtype=torch.float64) * 0.4
    exact = _true_logdet(flow.eval(), x)
    flow.train()
    torch.manual_seed(1)
    with torch.no_grad():
        # one Geometric draw per block and call is shared by the batch: a call's mean is one independent draw
        call_means = torch.stack([flow(x.repeat(reps, 1))[1].view(reps, -1).mean(0) for _ in range(n_calls)])
    mean, stderr = call_means.mean(0), call_means.std(0) / math.sqrt(n_calls)
    assert (stderr > 0).all(), "the training estimate should be stochastic"
    assert ((mean - exact).abs() < 4 * stderr + 1e-3).all(), (mean, exact, stderr)

    x_in = x.clone().requires_grad_(True)
    flow.log_prob(x_in).mean().backward()
    assert x_in.grad is not None and torch.isfinite(x_in.grad).all()
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("grad_estimator", ["neumann", "backprop"])
def test_training_gradient_is_unbiased(trained: ResidualFlow, grad_estimator: str) -> None:
    """Mean gradient of the training log-det over many draws = gradient of the exact log-det."""
    flow = copy.deepcopy(trained).double()
    for block in flow.blocks:
        block.grad_estimator = grad_estimator
    params = [p for n, p in flow.named_parameters() if "original" in n]  # the Linear weights
    x = torch.randn(6, 4, dtype=torch.float64) * 0.4
    flow.eval()
    exact = torch.autograd.grad(_exact_logdet_sum(flow, x), params)
    exact = torch.cat([g.flatten() for g in exact])
    flow.train()
    torch.manual_seed(2)
    draws = []
    for _ in range(300):
        with torch.no_grad():  # keep the power iteration's vectors fixed: the same bounded weights each draw
            state = {k: v.clone() for k, v in flow.state_dict().items()}
        grads = torch.autograd.grad(flow(x)[1].sum(), params)
        flow.load_state_dict(state)
        draws.append(torch.cat([g.flatten() for g in grads]))
    draws = torch.stack(draws)
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert (stderr > 0).any(), "the training gradient should be stochastic"
    z = (mean - exact).abs() / (stderr + 1e-12)
    big = exact.abs() > 1e-6
    # every one of ~5k components within 4.5 standard errors (seeded: the max is ~3.1 for both
    # estimators; reweighting the series' higher terms by 1.1 puts 2% of them beyond)
    assert (z[big] < 4.5).all(), z[big].max()
    assert (mean - exact).norm() / exact.norm() < 0.05


def _exact_logdet_sum(flow: ResidualFlow, x: torch.Tensor) -> torch.Tensor:
    """Σ over the batch of log|det ∂z/∂x| from the full Jacobian, differentiable in the parameters."""
    def z_of(xi: torch.Tensor) -> torch.Tensor:
        return flow(xi.unsqueeze(0))[0][0]

    jac = torch.func.vmap(torch.func.jacrev(z_of))(x)
    return torch.linalg.slogdet(jac).logabsdet.sum()


def test_series_eval_is_deterministic_batch_independent_and_close(trained: ResidualFlow) -> None:
    torch.manual_seed(3)
    flow = copy.deepcopy(trained).double()
    x = torch.randn(32, 4, dtype=torch.float64) * 0.4
    with torch.no_grad():
        exact = _true_logdet(flow, x)  # full Jacobian of the whole flow
    for block in flow.blocks:
        block.exact_max_dim = 0
    with torch.no_grad():
        first, again, part = flow(x)[1], flow(x)[1], flow(x[5:9])[1]
    assert torch.equal(first, again)
    torch.testing.assert_close(part, first[5:9])
    assert (first - exact).abs().mean() < 0.25, (first - exact).abs().mean()  # only 4 probes (default)

    # More probes through the config: the Hutchinson noise shrinks (measured mean error ~0.011 with
    # 500 probes vs ~0.09 with 4; dropping the series' terms from the 4th on alone costs ~0.04).
    many = ResidualFlow(4, n_blocks=4, hidden=32, eval_n_probes=500, exact_max_dim=0).double()
    many.load_state_dict(flow.state_dict())
    assert all(block.eval_probes.shape == (500, 4) for block in many.blocks)
    with torch.no_grad():
        assert (many.eval()(x)[1] - exact).abs().mean() < 0.025

    # All 16 Rademacher sign vectors: E[εεᵀ] = I holds exactly over them, so the probe average is the
    # exact trace of every power and only the truncation after eval_n_terms = 20 remains (~2e-8 here;
    # a wrong coefficient or a missing term anywhere up to the 10th order would cost > 5e-5).
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)), dtype=torch.float64)
    for block in flow.blocks:
        block.eval_probes = signs
    with torch.no_grad():
        enumerated = flow(x)[1]
    torch.testing.assert_close(enumerated, exact, rtol=0, atol=1e-6)


def test_inverse_recovers_input(trained: ResidualFlow) -> None:
    cases = [(_initialised(_flow(5, actnorm=True), torch.randn(64, 5) * 3).double(),
              torch.randn(32, 5, dtype=torch.float64) * 3),
             (copy.deepcopy(trained).double(), torch.randn(32, 4, dtype=torch.float64) * 0.4)]
    for flow, x in cases:
        with torch.no_grad():
            z, _ = flow(x)
        torch.testing.assert_close(flow.inverse(z, n_iter=500, atol=1e-12), x, rtol=0, atol=1e-8)
    assert flow.sample(7).shape == (7, 4)


def test_each_residual_branch_is_a_contraction(trained: ResidualFlow) -> None:
    for flow in (_flow(6, hidden=32, coeff=0.9).eval(), trained):
        coeff = flow.blocks[0].g[0].parametrizations.weight[0].coeff
        assert all(s <= coeff * (1 + 1e-4) for s in spectral_norms(flow).values())
        dim = flow.dim
        x, y = torch.randn(2, 4096, dim)
        y = torch.where(torch.rand(4096, 1) < 0.5, y, x + 1e-3 * torch.randn_like(x))  # far and near pairs
        with torch.no_grad():
            for block in flow.blocks:
                ratio = (block.g(x) - block.g(y)).norm(dim=1) / (x - y).norm(dim=1)
                assert ratio.max() < 1.0


def test_density_integrates_to_one() -> None:
    flow = _flow(2, hidden=32, n_blocks=4).double().eval()
    grid = torch.linspace(-12, 12, 241, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    with torch.no_grad():
        log_p = flow.log_prob(torch.stack([xx, yy], -1).view(-1, 2))
    standard = -0.5 * (xx.pow(2) + yy.pow(2)).view(-1) - math.log(2 * math.pi)
    assert (log_p - standard).abs().max() > 0.5, "the flow should not be the identity"
    density = log_p.exp().view(241, 241)
    mass = torch.trapezoid(torch.trapezoid(density, grid, dim=1), grid)
    assert abs(mass.item() - 1) < 1e-3


def test_fit_learns_a_shifted_scaled_gaussian() -> None:
    torch.manual_seed(0)
    mean, std = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])
    target = torch.distributions.Independent(torch.distributions.Normal(mean, std), 1)
    flow = ResidualFlow(2, n_blocks=4, hidden=32)
    opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
    for _ in range(300):
        loss = -flow.log_prob(target.sample((256,))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = target.sample((4000,))
    with torch.no_grad():
        fitted, untrained = flow.eval().log_prob(test).mean(), _flow(2, False, n_blocks=4, hidden=32).eval().log_prob(test).mean()
    ideal = target.log_prob(test).mean()
    assert fitted > untrained + 1.0
    assert abs(fitted - ideal) < 0.05, (fitted, ideal)


@pytest.mark.parametrize("exact_max_dim", [64, 0])
def test_inference_mode_scores_like_no_grad(exact_max_dim: int) -> None:
    """Lightning evaluates under torch.inference_mode, where autograd (the VJPs) is refused."""
    flow = _flow(3, exact_max_dim=exact_max_dim, actnorm=True).eval()
    x = torch.randn(8, 3)
    with torch.inference_mode():
        scored = flow.log_prob(x)
    with torch.no_grad():
        torch.testing.assert_close(scored.clone(), flow.log_prob(x))
    flow.train()
    flow.log_prob(x).mean().backward()  # training still works after an inference-mode pass
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("bad", "message"), [
    ({"coeff": 1.0}, r"coeff must be in \(0, 1\).*got 1\.0"),
    ({"base": "laplace"}, r"base must be 'normal'.*got 'laplace'"),
    ({"probe": "sphere"}, r"probe must be 'rademacher' or 'gaussian', got 'sphere'"),
    ({"grad_estimator": "adjoint"}, r"grad_estimator must be 'neumann' or 'backprop', got 'adjoint'"),
    ({"n_blocks": 0}, r"counts must be >= 1, got \{'n_blocks': 0,"),
    ({"eval_n_probes": 0}, r"counts must be >= 1, got .*'eval_n_probes': 0"),
])
def test_invalid_configs_say_so(bad: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ResidualFlow(2, **bad)
