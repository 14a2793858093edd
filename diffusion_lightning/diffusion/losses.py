"""Training losses."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

Weighting = Literal["truncated_snr", "snr+1", "snr", "constant"]


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def l_simple(model_output: Tensor, target: Tensor) -> Tensor:
    """DDPM eq. 14, per sample: || target - output ||^2 averaged over pixels (target = eps for the
    paper's parameterisation; x_0 or v for the others)."""
    return mean_flat((target - model_output) ** 2)


def loss_weight(sigma: Tensor, weighting: Weighting = "truncated_snr") -> Tensor:
    """The weight of ||x0_hat - x0||^2 at noise level sigma (x = x0 + sigma eps), with SNR = alpha^2 / sigma_vp^2 =
    1 / sigma^2 (Salimans & Ho 2022, Sec. 4): ``truncated_snr`` max(SNR, 1) = max(x-MSE, eps-MSE) per sample,
    ``snr+1`` SNR + 1 (the v-MSE), ``snr`` SNR (the eps-MSE), ``constant`` 1 (the x-MSE)."""
    snr = sigma.reciprocal().square()
    if weighting == "truncated_snr":
        return snr.clamp(min=1.0)
    if weighting == "snr+1":
        return snr + 1.0
    if weighting == "snr":
        return snr
    if weighting == "constant":
        return snr.new_ones(())
    raise ValueError(f"unknown weighting {weighting!r}: use truncated_snr, snr+1, snr or constant")
