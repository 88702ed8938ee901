"""Glow, RealNVP and MAF for feature vectors, built from ``nflows`` transforms.

The layers themselves (ActNorm, LU-decomposed invertible linear, affine coupling, masked
autoregressive transform, batch norm) are nflows'; this module only chooses how to stack
them for D-dimensional latent features (as in LDE, Cook et al. 2024) and adapts the result
to the project's flow contract with :class:`NflowsFlow`.

Why the normalisation layers everywhere: nflows' affine coupling bounds its per-layer
scale to ``sigmoid(·+2)+1e-3 < 1.001`` (data -> noise), so couplings can only contract.
L2-normalised features have per-coordinate spread ~1/sqrt(D), far narrower than N(0, I),
so each stack contains a layer that can expand: ActNorm (data-dependent init to zero mean,
unit variance on the first training batch) or batch norm.
"""

from __future__ import annotations

from nflows.distributions.normal import StandardNormal
from nflows.flows import Flow
from nflows.transforms import (
    ActNorm,
    AffineCouplingTransform,
    BatchNorm,
    CompositeTransform,
    LULinear,
    MaskedAffineAutoregressiveTransform,
    ReversePermutation,
    Transform,
)
from nflows.utils.torchutils import create_alternating_binary_mask
from torch import Tensor, nn

from ood_lightning.core.errors import ConfigError


class NflowsFlow(nn.Module):
    """An ``nflows.flows.Flow`` seen through the project's flow contract.

    ``log_prob(h) -> [B]`` and ``forward(h) -> (z, logdet)`` with ``z`` the base-space
    point and ``logdet = log|det ∂z/∂h|`` ([B]), so ``log_prob = log N(z) + logdet``.
    """

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    @classmethod
    def standard_normal(cls, transform: Transform, dim: int) -> NflowsFlow:
        """The usual case: ``transform`` maps data to a standard normal base of ``dim`` dims."""
        return cls(Flow(transform, StandardNormal([dim])))

    def log_prob(self, h: Tensor) -> Tensor:
        return self.flow.log_prob(h)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        # nflows keeps the transform under a private name and exposes no public data->noise call.
        return self.flow._transform(h)


def _check(dim: int, n_blocks: int) -> None:
    if dim < 2:
        raise ConfigError(f"coupling and autoregressive flows need at least 2 feature dims, got {dim}")
    if n_blocks < 1:
        raise ConfigError(f"a flow needs n_blocks >= 1, got {n_blocks}")


class _Conditioner(nn.Sequential):
    """in -> hidden -> out MLP; nflows couplings call their net with a (here unused) context."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))
        # Zero last layer: each coupling starts as a fixed elementwise scale, the Glow recipe for a stable start.
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return super().forward(x)


def _coupling(dim: int, i: int, hidden: int) -> AffineCouplingTransform:
    """Affine coupling of block ``i``; masks alternate so every coordinate gets transformed."""
    return AffineCouplingTransform(create_alternating_binary_mask(dim, even=i % 2 == 0),
                                   lambda n_in, n_out: _Conditioner(n_in, hidden, n_out))


def glow(dim: int, n_blocks: int = 10, hidden: int | None = None) -> NflowsFlow:
    """Glow for vectors: n_blocks × [ActNorm, LU invertible linear, affine coupling].

    ``hidden`` (default 4·dim, e.g. 2048 for 512-d features) is the width of each
    coupling's one-hidden-layer conditioner (conditioning half -> hidden -> scale & shift).
    """
    _check(dim, n_blocks)
    hidden = hidden or 4 * dim
    layers: list[Transform] = []
    for i in range(n_blocks):
        layers += [ActNorm(dim), LULinear(dim, identity_init=True), _coupling(dim, i, hidden)]
    return NflowsFlow.standard_normal(CompositeTransform(layers), dim)


def realnvp(dim: int, n_blocks: int = 10, hidden: int | None = None, batch_norm: bool = True) -> NflowsFlow:
    """RealNVP: n_blocks × [affine coupling (alternating masks), batch norm].

    ``batch_norm=True`` follows the RealNVP paper: training uses batch statistics and
    ``eval()`` running averages, so call ``eval()`` before scoring. ``batch_norm=False``
    replaces them with a single leading ActNorm, whose result does not depend on the batch.
    """
    _check(dim, n_blocks)
    hidden = hidden or 4 * dim
    layers: list[Transform] = [] if batch_norm else [ActNorm(dim)]
    for i in range(n_blocks):
        layers.append(_coupling(dim, i, hidden))
        if batch_norm:
            layers.append(BatchNorm(dim))
    return NflowsFlow.standard_normal(CompositeTransform(layers), dim)


def maf(dim: int, n_blocks: int = 5, hidden: int | None = None) -> NflowsFlow:
    """Masked autoregressive flow: leading ActNorm, then n_blocks × [MADE affine, reverse permutation].

    ``hidden`` (default 4·dim) is the MADE width; the reversal alternates the variable order.
    """
    _check(dim, n_blocks)
    hidden = hidden or 4 * dim
    layers: list[Transform] = [ActNorm(dim)]
    for _ in range(n_blocks):
        layers += [MaskedAffineAutoregressiveTransform(features=dim, hidden_features=hidden), ReversePermutation(dim)]
    return NflowsFlow.standard_normal(CompositeTransform(layers), dim)


#: flow builders by config name: ``(dim, n_blocks=..., hidden=..., **kwargs) -> flow``
FLOWS = {"glow": glow, "realnvp": realnvp, "maf": maf}
