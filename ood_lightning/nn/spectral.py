"""Coefficient-bounded spectral normalisation (Gouk et al. 2021; as used by DUE, SNGP and DHM).

A layer whose estimated largest singular value σ is at most ``coeff`` is left exactly as it is;
a larger one is scaled down to ``coeff``: ``W ← W / max(1, σ / coeff)``. This bounds the layer's
Lipschitz constant without forcing every layer to norm 1, which is what distance-aware feature
extractors (bi-Lipschitz, so feature collapse is limited) and invertible residual blocks need.

Why not ``torch.nn.utils.parametrizations.spectral_norm``: it always divides by σ (norm exactly
1, no coefficient) and, for convolutions, normalises the reshaped kernel matrix. We keep the
library's mechanism (a ``torch.nn.utils.parametrize`` parametrization, so ``module.weight`` is
the bounded weight and checkpoints hold the raw one) and write only the bound itself.

Convolutions. The reshaped ``[C_out, C_in·kh·kw]`` kernel matrix does *not* bound the Lipschitz
constant of the convolution as an operator on images: each input pixel enters up to kh·kw
outputs, so the true norm can be up to sqrt(kh·kw) times larger (for a 3x3 averaging kernel, 3x;
Gouk et al. 2021, Behrmann et al. 2019). ``mode="operator"`` (default) therefore runs the power
iteration on the convolution itself, ``conv2d`` forwards and ``conv_transpose2d`` (its adjoint)
backwards, on one input of the layer's input shape, recorded on the first forward (the largest
spatial size seen is kept: on a zero-padded convolution the norm can only grow with the image).
Until that first forward a conv's weight is returned unchanged. ``mode="matrix"`` keeps the
cheaper reshaped-matrix bound (Miyato et al. 2018) for comparison.

Power iteration vectors are buffers kept across steps: ``n_power_iterations`` per *training*
access of the weight (one per training forward for ordinary layers), none in eval mode, so a
trained model evaluates deterministically. They are warm-started exactly (SVD) for matrices
and with ``n_init_iterations`` iterations for conv operators, so the bound holds from step one.

BatchNorm (``batchnorm=True``, the default) is bounded too, as in DUE's spectral batch norm and
the DHM authors' code: in eval mode BN is the per-channel affine map x ↦ γ(x − μ)/sqrt(σ² + ε) + β,
whose Lipschitz constant is max |γ| / sqrt(running_var + ε); γ is divided by max(1, that / coeff).
The factor is computed from the *running* variance in both modes (DUE's rule): training still
normalises with the batch statistics, so the bound is exact for the eval-mode network and
approximate for a training batch. Without it ``spectral_coeff`` bounds nothing about a network
with BN, whose scales are free. ``batchnorm=False`` leaves BN free (our earlier behaviour).
The BN layers keep their class's state (same state_dict keys); their class becomes the
``Bounded*`` subclass in place, so references to them and their parameters stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from ood_lightning.core.errors import ConfigError

Mode = Literal["operator", "matrix"]

_EPS = 1e-12


def _normalize(x: Tensor) -> Tensor:
    return x / x.norm().clamp_min(_EPS)


def _full_precision(weight: Tensor) -> Tensor:
    """float16/bfloat16 are too coarse for a power iteration: promote them to float32."""
    return weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight


class SpectralNormBound(nn.Module):
    """Parametrization ``W -> W / max(1, σ(W) / coeff)`` with persistent power-iteration vectors.

    Subclasses define the linear operator of the weight (``operator``) and its adjoint (``adjoint``),
    and the shapes of ``u`` (output side) and ``v`` (input side).
    """

    u: Tensor
    v: Tensor

    def __init__(self, coeff: float, n_power_iterations: int = 1) -> None:
        super().__init__()
        if coeff <= 0:
            raise ConfigError(f"spectral norm coeff must be > 0 (or None to switch it off), got {coeff}")
        if n_power_iterations < 1:
            raise ConfigError(f"n_power_iterations must be >= 1, got {n_power_iterations}")
        self.coeff = float(coeff)
        self.n_power_iterations = int(n_power_iterations)

    # operator of the weight ------------------------------------------------------------------
    def operator(self, weight: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def adjoint(self, weight: Tensor, u: Tensor) -> Tensor:
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether ``u``/``v`` exist (a conv operator needs one forward to learn its input shape)."""
        return self.v.numel() > 0

    # power iteration --------------------------------------------------------------------------
    @torch.no_grad()
    def power_iteration(self, weight: Tensor, n: int) -> None:
        """``n`` steps of v ← Aᵀu/|·|, u ← Av/|·| on the buffers (in place)."""
        u, v = self.u.to(weight.dtype), self.v.to(weight.dtype)
        for _ in range(n):
            v = _normalize(self.adjoint(weight, u))
            u = _normalize(self.operator(weight, v))
        self.u.copy_(u)
        self.v.copy_(v)

    def converge(self, weight: Tensor, n_iterations: int) -> None:
        """Bring ``u``/``v`` to the top singular pair of ``weight`` (here: ``n_iterations`` more steps)."""
        self.power_iteration(weight, n_iterations)

    def sigma(self, weight: Tensor) -> Tensor:
        """Rayleigh estimate uᵀ A v of the largest singular value; differentiable in ``weight``."""
        # in training the buffers change in place next step: the graph keeps its own copies
        u, v = self.u.to(weight.dtype, copy=self.training), self.v.to(weight.dtype, copy=self.training)
        return (u * self.operator(weight, v)).sum()

    def forward(self, weight: Tensor) -> Tensor:
        if not self.ready():
            return weight
        # power iteration in full precision: bf16 autocast would make σ too coarse to bound anything
        with torch.autocast(weight.device.type, enabled=False):
            w = _full_precision(weight)
            if self.training:
                self.power_iteration(w.detach(), self.n_power_iterations)
            factor = torch.clamp(self.sigma(w) / self.coeff, min=1.0)
        return weight / factor.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}, n_power_iterations={self.n_power_iterations}"


class MatrixSpectralNormBound(SpectralNormBound):
    """Bound on the weight seen as a matrix ``[out, in·…]``: exact for Linear, the cheap proxy for conv."""

    def __init__(self, weight: Tensor, coeff: float, n_power_iterations: int = 1) -> None:
        super().__init__(coeff, n_power_iterations)
        self.register_buffer("u", weight.new_empty(weight.shape[0]))
        self.register_buffer("v", weight.new_empty(weight[0].numel()))
        # exact warm start, so σ is right from the first step (power iteration only tracks it)
        self.converge(weight, 0)

    @torch.no_grad()
    def converge(self, weight: Tensor, n_iterations: int) -> None:
        """Exact top singular pair by SVD (cheap for a matrix; close top singular values make
        power iteration slow), whatever ``n_iterations`` says."""
        left, _, right_h = torch.linalg.svd(_full_precision(weight.detach()).flatten(1), full_matrices=False)
        self.u.copy_(left[:, 0])
        self.v.copy_(right_h[0])

    def operator(self, weight: Tensor, v: Tensor) -> Tensor:
        return weight.flatten(1) @ v

    def adjoint(self, weight: Tensor, u: Tensor) -> Tensor:
        return weight.flatten(1).t() @ u


class ConvOperatorSpectralNormBound(SpectralNormBound):
    """Bound on the convolution as an operator on ``[C_in, H, W]`` inputs (the true Lipschitz constant).

    ``u``/``v`` are one output/input image; they are created by ``record_input_shape`` (a forward
    pre-hook of the conv) and resized when a checkpoint with recorded shapes is loaded.
    """

    def __init__(self, conv: nn.Conv2d, coeff: float, n_power_iterations: int = 1, n_init_iterations: int = 50) -> None:
        super().__init__(coeff, n_power_iterations)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ConfigError(f"operator spectral norm supports zero padding given as numbers, got padding="
                              f"{conv.padding!r}, padding_mode={conv.padding_mode!r}; use mode='matrix'")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.n_init_iterations = int(n_init_iterations)
        self.register_buffer("u", torch.empty(0))
        self.register_buffer("v", torch.empty(0))

    def operator(self, weight: Tensor, v: Tensor) -> Tensor:
        return F.conv2d(v, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def adjoint(self, weight: Tensor, u: Tensor) -> Tensor:
        # conv_transpose2d is the adjoint of conv2d; output_padding restores the rows/cols that a
        # strided conv never reads (they get zero gradient, as they should)
        in_hw = self.v.shape[-2:]
        out_padding = tuple(
            in_hw[i] - ((u.shape[-2 + i] - 1) * self.stride[i] - 2 * self.padding[i]
                        + self.dilation[i] * (weight.shape[-2 + i] - 1) + 1)
            for i in range(2)
        )
        return F.conv_transpose2d(u, weight, None, self.stride, self.padding, out_padding, self.groups,
                                  self.dilation)

    def record_input_shape(self, weight: Tensor, input_shape: torch.Size) -> None:
        """Create (or enlarge) ``u``/``v`` for one input of ``input_shape`` = (C, H, W), warm-started."""
        if self.ready() and input_shape[-2] * input_shape[-1] <= self.v.shape[-2] * self.v.shape[-1]:
            return
        # the first forward may be Lightning's sanity check under inference_mode: buffers made
        # there could never be updated in place by training, so make ordinary tensors
        with torch.inference_mode(False), torch.no_grad():
            w = _full_precision(weight.detach())
            self.v = _normalize(torch.randn(1, *input_shape, device=w.device, dtype=w.dtype))
            self.u = _normalize(self.operator(w, self.v))
            self.power_iteration(w, self.n_init_iterations)
            self.u, self.v = self.u.to(weight.dtype), self.v.to(weight.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # the shapes of u/v depend on the input size seen when the checkpoint was written
        for name in ("u", "v"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        shape = tuple(self.v.shape[1:]) if self.ready() else "not seen yet"
        return f"{super().extra_repr()}, mode=operator, input_shape={shape}"


def _record_conv_input_shape(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: give the operator bound of ``module.weight`` the input shape it acts on."""
    bound = _bound_of(module)
    if isinstance(bound, ConvOperatorSpectralNormBound):  # None once the parametrization is removed
        bound.record_input_shape(module.parametrizations.weight.original, args[0].shape[-3:])


def spectral_norm_bound(module: nn.Linear | nn.Conv2d, coeff: float, n_power_iterations: int = 1,
                        mode: Mode = "operator", n_init_iterations: int = 50) -> nn.Module:
    """Register the bound on ``module.weight`` (in place) and return ``module``."""
    if isinstance(module, nn.Conv2d) and mode == "operator":
        bound: SpectralNormBound = ConvOperatorSpectralNormBound(module, coeff, n_power_iterations, n_init_iterations)
    elif isinstance(module, (nn.Linear, nn.Conv2d)) and mode in ("operator", "matrix"):
        bound = MatrixSpectralNormBound(module.weight, coeff, n_power_iterations)
    else:
        raise ConfigError(f"spectral norm bound: expected nn.Linear or nn.Conv2d and mode 'operator' or 'matrix', "
                          f"got {type(module).__name__} with mode={mode!r}")
    parametrize.register_parametrization(module, "weight", bound)
    if isinstance(bound, ConvOperatorSpectralNormBound):
        module.register_forward_pre_hook(_record_conv_input_shape)
    return module


class BoundedBatchNorm(_BatchNorm):
    """BatchNorm whose scale max |γ| / sqrt(running_var + ε) is limited to ``spectral_coeff``.

    Mixed in front of ``nn.BatchNorm1d/2d/3d`` (the ``Bounded*`` classes below);
    :func:`bound_batchnorm` turns an existing layer into one in place.
    """

    spectral_coeff: float

    def _gamma(self) -> Tensor:
        return torch.ones_like(self.running_var) if self.weight is None else self.weight

    def eval_scales(self, weight: Tensor) -> Tensor:
        """|weight_c| / sqrt(running_var_c + ε): the per-channel slopes of the eval-mode map with ``weight``."""
        return (weight.float() * (self.running_var.float() + self.eps).rsqrt()).abs()

    def bound_factor(self) -> Tensor:
        """max(1, max_c |γ_c| / sqrt(running_var_c + ε) / coeff), from the running variance (DUE)."""
        return torch.clamp(self.eval_scales(self._gamma()).max() / self.spectral_coeff, min=1.0)

    def bounded_weight(self) -> Tensor:
        weight = self._gamma()
        return weight / self.bound_factor().to(weight.dtype)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        weight = self.bounded_weight()  # before this batch updates the running statistics
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(input, self.running_mean, self.running_var, weight, self.bias, self.training, factor,
                            self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, spectral_coeff={self.spectral_coeff}"


class BoundedBatchNorm1d(BoundedBatchNorm, nn.BatchNorm1d):
    pass


class BoundedBatchNorm2d(BoundedBatchNorm, nn.BatchNorm2d):
    pass


class BoundedBatchNorm3d(BoundedBatchNorm, nn.BatchNorm3d):
    pass


_BOUNDED_BN = {nn.BatchNorm1d: BoundedBatchNorm1d, nn.BatchNorm2d: BoundedBatchNorm2d,
               nn.BatchNorm3d: BoundedBatchNorm3d}


def bound_batchnorm(bn: nn.Module, coeff: float) -> nn.Module:
    """Bound ``bn``'s scale to ``coeff`` in place (its class becomes the ``Bounded*`` one); returns ``bn``."""
    if coeff <= 0:
        raise ConfigError(f"spectral norm coeff must be > 0 (or None to switch it off), got {coeff}")
    if isinstance(bn, BoundedBatchNorm):
        return bn
    cls = _BOUNDED_BN.get(type(bn))
    if cls is None or not bn.track_running_stats:
        raise ConfigError(f"spectral BatchNorm bound: expected nn.BatchNorm1d/2d/3d with running statistics, got "
                          f"{type(bn).__name__} (track_running_stats={getattr(bn, 'track_running_stats', None)}); "
                          "pass spectral_bn=false to leave BatchNorm free")
    bn.__class__ = cls
    bn.spectral_coeff = float(coeff)
    return bn


def apply_spectral_norm(module: nn.Module, coeff: float | None, n_power_iterations: int = 1,
                        mode: Mode = "operator", n_init_iterations: int = 50, batchnorm: bool = True,
                        exempt: Sequence[nn.Module] = ()) -> nn.Module:
    """Bound every ``nn.Conv2d`` and ``nn.Linear`` in ``module`` (in place), and with ``batchnorm``
    every BatchNorm's scale, except the layers in ``exempt``; ``coeff=None`` is a no-op.

    Layers that already carry a parametrized weight (e.g. a residual flow's own bound) or are
    already bounded BatchNorms are skipped.
    """
    if coeff is None:
        return module
    if mode not in ("operator", "matrix"):
        raise ConfigError(f"spectral norm mode must be 'operator' or 'matrix', got {mode!r}")
    free = {id(m) for m in exempt}
    for layer in list(module.modules()):
        if id(layer) in free:
            continue
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and not parametrize.is_parametrized(layer, "weight"):
            spectral_norm_bound(layer, coeff, n_power_iterations, mode, n_init_iterations)
        elif batchnorm and isinstance(layer, _BatchNorm):
            bound_batchnorm(layer, coeff)
    return module


def is_spectrally_bounded(module: nn.Module) -> bool:
    """Whether any layer of ``module`` already carries a spectral bound (weight or BatchNorm)."""
    return any(parametrize.is_parametrized(m, "weight") or isinstance(m, BoundedBatchNorm) for m in module.modules())


def _bound_of(layer: nn.Module) -> SpectralNormBound | None:
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    return next((p for p in layer.parametrizations.weight if isinstance(p, SpectralNormBound)), None)


@torch.no_grad()
def converge_spectral_norms(module: nn.Module, n_iterations: int = 200) -> nn.Module:
    """Re-converge every bounded layer's σ estimate (in place): SVD for matrices, ``n_iterations``
    power-iteration steps for conv operators (skipped until they have seen an input).

    One step per training forward lags a little behind fast-moving weights (σ underestimated by
    up to ~1% after aggressive Adam steps, so the bound is exceeded by as much); call this once
    before evaluating or saving to make the bound tight again.
    """
    for layer in module.modules():
        bound = _bound_of(layer)
        if bound is not None and bound.ready():
            bound.converge(layer.parametrizations.weight.original, n_iterations)
    return module


@torch.no_grad()
def spectral_norms(module: nn.Module, n_iterations: int = 200) -> dict[str, float]:
    """Largest singular value of every bounded layer's *effective* weight, for tests and monitoring
    (bounded BatchNorm: its largest eval-mode scale).

    Linear (and matrix-mode conv): exact, ``torch.linalg.matrix_norm(W, 2)`` of the (reshaped)
    weight. Operator-mode conv: ``n_iterations`` power iterations on the recorded input shape,
    started from the layer's own vectors (a lower estimate that converges from below); NaN if
    the layer has not seen an input yet. Does not touch the layers' buffers.
    """
    norms: dict[str, float] = {}
    for name, layer in module.named_modules():
        if isinstance(layer, BoundedBatchNorm):  # eval-mode map: per-channel scale γ' / sqrt(running_var + ε)
            norms[name] = float(layer.eval_scales(layer.bounded_weight()).max())
            continue
        bound = _bound_of(layer)
        if bound is None:
            continue
        weight = _full_precision(layer.parametrizations.weight.original)
        sigma = bound.sigma(weight) if bound.ready() else weight.new_zeros(())
        effective = weight / torch.clamp(sigma / bound.coeff, min=1.0)
        if isinstance(bound, ConvOperatorSpectralNormBound):
            if not bound.ready():
                norms[name] = float("nan")
                continue
            u, v = bound.u.to(weight.dtype), bound.v.to(weight.dtype)
            for _ in range(n_iterations):
                v = _normalize(bound.adjoint(effective, u))
                u = _normalize(bound.operator(effective, v))
            norms[name] = float(bound.operator(effective, v).norm())
        else:
            norms[name] = float(torch.linalg.matrix_norm(effective.flatten(1), 2))
    return norms
