"""Sample-quality statistics on extracted features: FID, KID and IS (float64, pure torch).

* FID: Heusel et al. (2017), d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
* KID: Binkowski et al. (2018), unbiased MMD^2 with the kernel k(x, y) = (gamma x.y + coef0)^degree,
  gamma = 1 / D, averaged over random subsets (torch-fidelity's defaults: 100 subsets of 1000).
* IS: Salimans et al. (2016), exp E_x KL(p(y|x) || p(y)), mean and std over ``splits`` chunks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


class LogitsUnavailableError(RuntimeError):
    """Raised when IS is requested from a feature extractor that has no classifier head."""


def _f64(x: ArrayLike) -> Tensor:
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


def feature_statistics(features: ArrayLike) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64 (as ``np.cov(rowvar=False)``)."""
    f = _f64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {tuple(f.shape)}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def sqrtm_psd(sigma: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix via its eigendecomposition (negative round-off -> 0)."""
    evals, evecs = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike) -> float:
    """tr((S1 S2)^(1/2)) for covariances S1, S2.

    S1 S2 is similar to the symmetric PSD M = S1^(1/2) S2 S1^(1/2), so tr((S1 S2)^(1/2)) = sum_i sqrt(eig_i(M)):
    two symmetric eigendecompositions, real by construction (no complex sqrtm, no imaginary round-off).
    """
    root1 = sqrtm_psd(_f64(sigma1))
    m = root1 @ _f64(sigma2) @ root1
    return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between N(mu1, S1) and N(mu2, S2): |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2)."""
    mu1, mu2, s1, s2 = _f64(mu1), _f64(mu2), _f64(sigma1), _f64(sigma2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"shape mismatch: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, sigma {tuple(s1.shape)}/{tuple(s2.shape)}"
        )
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace()) - 2.0 * trace_sqrt_product(s1, s2)


def fid_from_features(features1: ArrayLike, features2: ArrayLike) -> float:
    """FID between two (N, D) feature sets."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def polynomial_mmd2(
    features1: ArrayLike, features2: ArrayLike, degree: int = 3, coef0: float = 1.0, gamma: float | None = None
) -> float:
    """Unbiased MMD^2 estimate between two equal-size sets with the polynomial kernel (Binkowski et al. 2018, eq. 2
    with torch-fidelity's cross term): sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (m(m-1))
    - 2 sum_{i,j} k(x_i, y_j) / m^2."""
    x, y = _f64(features1), _f64(features2)
    if x.shape != y.shape or x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need two (m >= 2, D) sets of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    m, d = x.shape
    g = 1.0 / d if gamma is None else gamma

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        return (g * (a @ b.T) + coef0) ** degree

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    off_diag = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(off_diag - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features1: ArrayLike,
    features2: ArrayLike,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    coef0: float = 1.0,
    gamma: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """KID: mean and (population) std of :func:`polynomial_mmd2` over ``subsets`` random subsets of
    ``subset_size`` drawn without replacement from each set (torch-fidelity's procedure)."""
    x, y = _f64(features1), _f64(features2)
    if min(len(x), len(y)) < subset_size:
        raise ValueError(
            f"KID subset_size={subset_size} exceeds the number of samples ({len(x)}, {len(y)}); lower subset_size"
        )
    mmds = torch.empty(subsets, dtype=torch.float64)
    for i in range(subsets):
        xi = x[torch.randperm(len(x), generator=generator)[:subset_size]]
        yi = y[torch.randperm(len(y), generator=generator)[:subset_size]]
        mmds[i] = polynomial_mmd2(xi, yi, degree, coef0, gamma)
    return float(mmds.mean()), float(mmds.std(unbiased=False))


def inception_score(scores: ArrayLike | None, splits: int = 10, *, from_logits: bool = True) -> tuple[float, float]:
    """IS = exp(mean_x KL(p(y|x) || p(y))) on each of ``splits`` consecutive chunks (p(y) = the chunk's mean
    posterior); returns the mean and (population) std over chunks, like torch-fidelity with ``shuffle=False``.

    ``scores`` are (N, K) logits (``from_logits``) or class probabilities. Bounds: 1 <= IS <= K.
    """
    if scores is None:
        raise LogitsUnavailableError("IS unavailable: the feature extractor produced no logits (no classifier head)")
    s = _f64(scores)
    if s.ndim != 2 or s.shape[0] < splits:
        raise ValueError(f"need (N >= splits={splits}, K) scores, got shape {tuple(s.shape)}")
    if from_logits:
        p = torch.softmax(s, dim=1)
    else:
        if bool((s < 0).any()) or not torch.allclose(s.sum(1), torch.ones(len(s), dtype=s.dtype), atol=1e-6):
            raise ValueError("probabilities must be non-negative and sum to 1 per row")
        p = s
    n = len(p)
    values = []
    for i in range(splits):
        chunk = p[i * n // splits : (i + 1) * n // splits]
        q = chunk.mean(0, keepdim=True)
        kl = (torch.special.xlogy(chunk, chunk) - torch.special.xlogy(chunk, q)).sum(1)  # 0 log 0 = 0
        values.append(float(kl.mean().exp()))
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std(unbiased=False))
