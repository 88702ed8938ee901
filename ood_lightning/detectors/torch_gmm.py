"""Full-covariance Gaussian-mixture EM in torch, on any device (LSGM's ``backend="torch"``).

scikit-learn's ``GaussianMixture`` runs EM on the CPU with a Python loop over components; on
wide layers (the paper's un-projected 256/512-d features, 45k inputs, 50-200 components) that
is the cost of the whole LSGM fit. This is the same EM, step for step, batched over components
and chunked over samples, in float64 on the model's device. Each step is one large matrix
product per chunk (all components at once), on data shifted by its mean (which changes no
likelihood and keeps the second-moment form of the covariance free of cancellation):

* initialisation: scikit-learn's own (``KMeans(n_init=1, random_state)`` labels as one-hot
  responsibilities, then one M-step), or explicit ``weights_init`` / ``means_init`` /
  ``precisions_init`` as in scikit-learn;
* M-step: N_k = Σ_n r_nk + 10·eps, μ_k = Σ_n r_nk x_n / N_k, Σ_k = Σ_n r_nk (x_n − μ_k)(x_n − μ_k)ᵀ / N_k
  + reg_covar·I, π_k = N_k / Σ_j N_j; the precision factor is L_k⁻ᵀ for Σ_k = L_k L_kᵀ;
* stop when the mean log-likelihood (computed in the E-step, before the M-step) changes by
  less than ``tol``, or after ``max_iter`` iterations; the parameters are those of the last M-step.

So with the same initial parameters it agrees with scikit-learn to round-off
(``tests/test_lsgm_torch_gmm.py``; ``benchmarks/gmm_em.py`` measures both).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from ood_lightning.core.errors import ConfigError

#: elements of one [chunk, K·D] block of the E- and M-steps
_CHUNK_ELEMENTS = 1 << 22


def _as_float64(x: np.ndarray | Tensor, device: torch.device) -> Tensor:
    return torch.as_tensor(x).to(device, torch.float64)


class TorchGaussianMixture:
    """EM for a full-covariance Gaussian mixture; the fitted attributes mirror scikit-learn's.

    After :meth:`fit`: ``weights_`` [K], ``means_`` [K, D], ``covariances_`` and
    ``precisions_cholesky_`` [K, D, D] (float64 numpy arrays, as scikit-learn's), and
    ``converged_``, ``n_iter_``, ``lower_bound_``.
    """

    def __init__(self, n_components: int, reg_covar: float = 1e-6, max_iter: int = 100, tol: float = 1e-3,
                 random_state: int | None = 0, device: torch.device | str = "cpu",
                 weights_init: np.ndarray | None = None, means_init: np.ndarray | None = None,
                 precisions_init: np.ndarray | None = None, chunk_elements: int = _CHUNK_ELEMENTS) -> None:
        if int(n_components) < 1 or reg_covar < 0 or int(max_iter) < 1 or tol < 0:
            raise ConfigError(f"TorchGaussianMixture needs n_components >= 1, reg_covar >= 0, max_iter >= 1, tol >= 0; "
                              f"got {n_components}, {reg_covar}, {max_iter}, {tol}")
        self.n_components, self.reg_covar = int(n_components), float(reg_covar)
        self.max_iter, self.tol, self.random_state = int(max_iter), float(tol), random_state
        device = torch.device(device)
        self.device = torch.device("cpu") if device.type == "mps" else device  # MPS has no float64
        self.weights_init, self.means_init, self.precisions_init = weights_init, means_init, precisions_init
        self.chunk_elements = int(chunk_elements)

    # ------------------------------------------------------------------ the two steps

    def _rows(self, d: int) -> int:
        return max(1, self.chunk_elements // max(1, self.n_components * d))

    def _log_prob(self, x: Tensor, means: Tensor, prec_chol: Tensor) -> Tensor:
        """log N(x_n; μ_k, Σ_k) [N, K]: y = x·C_k − μ_k·C_k for every k in one product per chunk."""
        k, d = means.shape
        log_det = torch.log(torch.diagonal(prec_chol, dim1=1, dim2=2)).sum(1)
        stacked = prec_chol.permute(1, 0, 2).reshape(d, k * d)  # [D, K·D]: the C_k side by side
        offset = (means[:, None, :] @ prec_chol).reshape(k * d)
        parts = []
        for chunk in x.split(self._rows(d)):
            y = (chunk @ stacked).sub_(offset).square_()
            parts.append(y.view(len(chunk), k, d).sum(-1))
        return -0.5 * (d * math.log(2 * math.pi) + torch.cat(parts)) + log_det

    def _e_step(self, x: Tensor, params: tuple[Tensor, Tensor, Tensor]) -> tuple[float, Tensor]:
        """Mean log-likelihood and log-responsibilities [N, K]."""
        weights, means, prec_chol = params
        weighted = self._log_prob(x, means, prec_chol) + weights.log()
        norm = torch.logsumexp(weighted, 1)
        return float(norm.mean()), weighted - norm[:, None]

    def _m_step(self, x: Tensor, resp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Weights, means and covariances (+ reg_covar·I) from responsibilities [N, K].

        Σ_k = Σ_n r_nk x_n x_nᵀ / N_k − μ_k μ_kᵀ, which equals scikit-learn's centred sum
        Σ_n r_nk (x_n − μ_k)(x_n − μ_k)ᵀ / N_k up to a 10·eps/N_k relative term.
        """
        nk = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps
        means = resp.T @ x / nk[:, None]
        k, d = means.shape
        second = torch.zeros(k * d, d, dtype=x.dtype, device=x.device)
        rows = self._rows(d)
        for chunk, r in zip(x.split(rows), resp.split(rows)):
            weighted = (r[:, :, None] * chunk[:, None, :]).view(len(chunk), k * d)  # r_nk x_n
            second.addmm_(weighted.T, chunk)
        cov = second.view(k, d, d) / nk[:, None, None] - means[:, :, None] * means[:, None, :]
        cov.diagonal(dim1=1, dim2=2).add_(self.reg_covar)
        return nk / nk.sum(), means, cov

    @staticmethod
    def _precision_cholesky(cov: Tensor) -> Tensor:
        chol, info = torch.linalg.cholesky_ex(cov)
        if bool((info > 0).any()):
            raise ConfigError("LSGM (backend=torch): some mixture components have an ill-defined covariance "
                              "(singleton or collapsed samples); use fewer components or a larger reg_covar")
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)
        return torch.linalg.solve_triangular(chol, eye, upper=False).mT

    # -------------------------------------------------------------------------- fit

    def _initial(self, x: Tensor, x_np: np.ndarray, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Initial parameters for the shifted data ``x`` (= data − ``shift``)."""
        explicit = (self.weights_init, self.means_init, self.precisions_init)
        if all(p is not None for p in explicit):
            prec = _as_float64(self.precisions_init, x.device)
            chol, info = torch.linalg.cholesky_ex(prec)
            if bool((info > 0).any()):
                raise ConfigError("TorchGaussianMixture: precisions_init must be symmetric positive definite")
            return _as_float64(self.weights_init, x.device), _as_float64(self.means_init, x.device) - shift, chol
        if any(p is not None for p in explicit):
            raise ConfigError("TorchGaussianMixture: pass all of weights_init, means_init, precisions_init or none")
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=self.n_components, n_init=1, random_state=self.random_state).fit(x_np).labels_
        resp = torch.zeros(len(x), self.n_components, dtype=x.dtype, device=x.device)
        resp[torch.arange(len(x), device=x.device), torch.as_tensor(labels, device=x.device).long()] = 1
        weights, means, cov = self._m_step(x, resp)
        return weights, means, self._precision_cholesky(cov)

    def fit(self, x: np.ndarray | Tensor) -> TorchGaussianMixture:
        x_np = np.asarray(torch.as_tensor(x).detach().cpu(), dtype=np.float64)
        if x_np.ndim != 2 or len(x_np) < max(2, self.n_components):
            raise ConfigError(f"TorchGaussianMixture: need [N, D] data with N >= max(2, n_components="
                              f"{self.n_components}), got shape {x_np.shape}")
        xt = _as_float64(x_np, self.device)
        self._shift = xt.mean(0)
        xt = xt - self._shift  # a new tensor: the caller's array (shared memory on the CPU) stays as it was
        params = self._initial(xt, x_np, self._shift)
        cov = None
        lower_bound, self.converged_ = -math.inf, False
        for n_iter in range(1, self.max_iter + 1):  # noqa: B007 (read after the loop)
            previous = lower_bound
            lower_bound, log_resp = self._e_step(xt, params)
            weights, means, cov = self._m_step(xt, log_resp.exp())
            params = (weights, means, self._precision_cholesky(cov))
            if abs(lower_bound - previous) < self.tol:
                self.converged_ = True
                break
        if not self.converged_:
            from sklearn.exceptions import ConvergenceWarning

            warnings.warn(f"TorchGaussianMixture did not converge in {self.max_iter} iterations (tol {self.tol})",
                          ConvergenceWarning, stacklevel=2)
        self.n_iter_, self.lower_bound_ = n_iter, lower_bound
        self._params = params
        self.weights_, self.means_, self.precisions_cholesky_ = (p.cpu().numpy() for p in params)
        self.means_ = self.means_ + self._shift.cpu().numpy()
        self.covariances_ = cov.cpu().numpy()
        return self

    def score_samples(self, x: np.ndarray | Tensor) -> np.ndarray:
        """log p(x_n) under the fitted mixture [N]."""
        weights, means, prec_chol = self._params
        xt = _as_float64(x, self.device) - self._shift
        return torch.logsumexp(self._log_prob(xt, means, prec_chol) + weights.log(), 1).cpu().numpy()

    def score(self, x: np.ndarray | Tensor) -> float:
        """Mean log-likelihood (scikit-learn's ``score``)."""
        return float(self.score_samples(x).mean())
