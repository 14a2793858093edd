"""Training losses."""

from __future__ import annotations

from torch import Tensor


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def l_simple(model_output: Tensor, target: Tensor) -> Tensor:
    """DDPM eq. 14, per sample: || target - output ||^2 averaged over pixels (target = eps for the
    paper's parameterisation; x_0 or v for the others)."""
    return mean_flat((target - model_output) ** 2)
