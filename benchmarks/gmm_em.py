"""Our torch EM (LSGM ``backend=torch``) against scikit-learn's GaussianMixture on one fixed problem.

Both start from the same parameters (k-means labels, turned into weights / means / precisions
here) and run the same number of EM iterations (tol = 0). Prints each one's mean log-likelihood
on the data, their difference (must be < 1e-4, else exit status 1), the largest parameter
differences, and the wall time of each fit and their ratio, measured in this run:

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/gmm_em.py                # CPU, one thread each
    python benchmarks/gmm_em.py --devices cpu cuda --n 45000 --d 64 --k 50   # also on the GPU
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from ood_lightning.detectors.torch_gmm import TorchGaussianMixture


def problem(n: int, d: int, k: int, seed: int) -> np.ndarray:
    """n points from a random k-component, d-dimensional mixture of correlated Gaussians."""
    rng = np.random.default_rng(seed)
    means = 2.0 * rng.standard_normal((k, d))
    mix = rng.standard_normal((k, d, d)) / np.sqrt(d)
    j = rng.integers(0, k, n)
    return means[j] + np.einsum("nd,nde->ne", rng.standard_normal((n, d)), mix[j]) + 0.3 * rng.standard_normal((n, d))


def start(x: np.ndarray, k: int, reg_covar: float, seed: int) -> dict[str, np.ndarray]:
    """Initial weights, means and precisions from one k-means run (what both fits start from)."""
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x).labels_
    weights = np.bincount(labels, minlength=k) / len(x)
    means = np.stack([x[labels == c].mean(0) for c in range(k)])
    covs = np.stack([np.cov(x[labels == c].T, bias=True) + reg_covar * np.eye(x.shape[1]) for c in range(k)])
    return {"weights_init": weights, "means_init": means, "precisions_init": np.linalg.inv(covs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--reg-covar", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", nargs="+", default=["cpu"])
    args = parser.parse_args()
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    warnings.simplefilter("ignore", ConvergenceWarning)  # tol = 0: both run every iteration on purpose
    x = problem(args.n, args.d, args.k, args.seed)
    init = start(x, args.k, args.reg_covar, args.seed)
    common = {"n_components": args.k, "reg_covar": args.reg_covar, "max_iter": args.iters, "tol": 0.0}
    print(f"problem: N={args.n} D={args.d} K={args.k}, {args.iters} EM iterations from the same k-means start; "
          f"torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    ref = GaussianMixture(covariance_type="full", **common, **init).fit(x)
    t_ref = time.perf_counter() - t0
    ll_ref = ref.score(x)
    print(f"sklearn GaussianMixture: mean log-likelihood {ll_ref:.10f}, fit {t_ref:.3f} s")
    ok = True
    for device in args.devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"torch EM on {device}: skipped (no CUDA device)")
            continue
        TorchGaussianMixture(**{**common, "max_iter": 1}, **init, device=device).fit(x[:1000])  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ours = TorchGaussianMixture(**common, **init, device=device).fit(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t_ours = time.perf_counter() - t0
        ll = ours.score(x)
        diff = abs(ll - ll_ref)
        d_means = np.abs(ours.means_ - ref.means_).max()
        d_cov = np.abs(ours.covariances_ - ref.covariances_).max()
        ok &= diff < 1e-4
        print(f"torch EM on {device}: mean log-likelihood {ll:.10f}, |difference| {diff:.2e} "
              f"({'< 1e-4' if diff < 1e-4 else 'NOT < 1e-4'}); max |means diff| {d_means:.1e}, "
              f"max |covariances diff| {d_cov:.1e}; fit {t_ours:.3f} s, sklearn / torch = {t_ref / t_ours:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
