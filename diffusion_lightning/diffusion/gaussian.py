"""The Gaussian diffusion process: forward marginals, true posterior, parameterisations.

Notation follows Ho et al. (2020) "DDPM" and Nichol & Dhariwal (2021) "iDDPM". All schedule
tensors are float64 on the CPU; ``_extract`` gathers per-sample coefficients on the timesteps' device (a copy
of each schedule per device is cached, so a training step on a GPU makes no host-device transfer) and casts them
to the data's dtype.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

PredictionType = Literal["eps", "x0", "v"]
VarianceType = Literal["fixed_small", "fixed_large", "learned_range"]


@dataclass
class ModelPrediction:
    """A network's output at x_t in the terms of the process: the clean image, the noise and, for learned-variance
    models, the raw interpolation output v of iDDPM eq. 15 (frac = (v + 1) / 2)."""

    x0: Tensor
    eps: Tensor
    var_values: Tensor | None = None


_DEVICE_COPIES: weakref.WeakKeyDictionary[Tensor, dict[torch.device, Tensor]] = weakref.WeakKeyDictionary()


def _on_device(arr: Tensor, device: torch.device) -> Tensor:
    """``arr`` on ``device``, copied once per (array, device)."""
    if arr.device == device:
        return arr
    copies = _DEVICE_COPIES.setdefault(arr, {})
    if device not in copies:
        copies[device] = arr.to(device)
    return copies[device]


def _extract(arr: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """arr[t] broadcast to x's shape, on x's device and dtype (gathered where t lives: no host-device sync)."""
    out = _on_device(arr, t.device)[t.long()].to(device=x.device, dtype=x.dtype)
    return out.reshape(-1, *([1] * (x.ndim - 1)))


class GaussianDiffusion:
    """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) for t = 0..T-1 (DDPM eq. 4).

    ``timesteps`` maps this process's steps to the training process's (identity unless it was
    made by :meth:`respace`), so a network trained on T steps can run a shorter process.
    """

    def __init__(self, betas: Tensor | Sequence[float], timesteps: Sequence[int] | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be 1-D with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timesteps = torch.as_tensor(
            list(range(len(betas))) if timesteps is None else list(timesteps), dtype=torch.long
        )
        if len(self.timesteps) != self.num_timesteps:
            raise ValueError("timesteps and betas must have the same length")

        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log1p(-self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        # The noise level of x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps (Karras et al. 2022, Table 1, VP).
        self.sigmas = self.sqrt_recipm1_alphas_cumprod

        # q(x_{t-1} | x_t, x_0), DDPM eq. 6-7.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: clip the log at t = 0 to beta~_1, as in iDDPM's code.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
            if self.num_timesteps > 1
            else self.betas
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (
            1.0 - self.alphas_cumprod
        )

    # ----------------------------------------------------------------- respacing
    def respace(self, use_timesteps: Sequence[int]) -> GaussianDiffusion:
        """The process restricted to ``use_timesteps`` (iDDPM Sec. 4): keep alpha_bar at those
        steps and recompute beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}."""
        keep = sorted(set(int(t) for t in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps})")
        abar = self.alphas_cumprod[keep]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return GaussianDiffusion(1.0 - abar / abar_prev, timesteps=self.timesteps[keep].tolist())

    # ----------------------------------------------------------------- forward process
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) (DDPM eq. 4)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x0) * x0
        var = _extract(1.0 - self.alphas_cumprod, t, x0).expand_as(x0)
        log_var = _extract(self.log_one_minus_alphas_cumprod, t, x0).expand_as(x0)
        return mean, var, log_var

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            _extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(
        self, x0: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x0 + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        var = _extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_var = _extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, var, log_var

    # ----------------------------------------------------------------- parameterisations
    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (DDPM eq. 4 inverted)."""
        return _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        ) * eps

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def v_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, Sec. 4)."""
        return _extract(self.sqrt_alphas_cumprod, t, x0) * eps - _extract(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * x0

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return _extract(self.sqrt_alphas_cumprod, t, x_t) * x_t - _extract(
            self.sqrt_one_minus_alphas_cumprod, t, x_t
        ) * v

    def prediction_from_output(
        self, output: Tensor, x_t: Tensor, t: Tensor, prediction_type: PredictionType
    ) -> ModelPrediction:
        """Turn a network's raw output (C or 2C channels) into x_0, eps and variance values."""
        var_values = None
        channels = x_t.shape[1]
        if output.shape[1] == 2 * channels:
            output, var_values = output.split(channels, dim=1)
        elif output.shape[1] != channels:
            raise ValueError(f"network output has {output.shape[1]} channels, expected {channels} or {2 * channels}")
        if prediction_type == "eps":
            return ModelPrediction(self.predict_x0_from_eps(x_t, t, output), output, var_values)
        if prediction_type == "x0":
            return ModelPrediction(output, self.predict_eps_from_x0(x_t, t, output), var_values)
        if prediction_type == "v":
            x0 = self.predict_x0_from_v(x_t, t, output)
            return ModelPrediction(x0, self.predict_eps_from_x0(x_t, t, x0), var_values)
        raise ValueError(f"unknown prediction_type {prediction_type!r}: use 'eps', 'x0' or 'v'")

    def training_target(self, x0: Tensor, eps: Tensor, t: Tensor, prediction_type: PredictionType) -> Tensor:
        """What the network regresses on for L_simple (DDPM eq. 14 for eps)."""
        if prediction_type == "eps":
            return eps
        if prediction_type == "x0":
            return x0
        if prediction_type == "v":
            return self.v_target(x0, eps, t)
        raise ValueError(f"unknown prediction_type {prediction_type!r}: use 'eps', 'x0' or 'v'")

    # ----------------------------------------------------------------- reverse process
    def model_log_variance(
        self, variance_type: VarianceType, t: Tensor, x: Tensor, var_values: Tensor | None = None
    ) -> Tensor:
        """log Sigma_theta(x_t, t).

        fixed_small: beta~_t (clipped log); fixed_large: beta_t, with beta~_1 at t=0 as in DDPM's
        code; learned_range: iDDPM eq. 15, frac log beta_t + (1 - frac) log beta~_t, frac=(v+1)/2.
        """
        if variance_type == "fixed_small":
            return _extract(self.posterior_log_variance_clipped, t, x).expand_as(x)
        if variance_type == "fixed_large":
            large = torch.cat([self.posterior_variance[1:2], self.betas[1:]]) if self.num_timesteps > 1 else self.betas
            return _extract(torch.log(large), t, x).expand_as(x)
        if variance_type == "learned_range":
            if var_values is None:
                raise ValueError("learned_range variance needs a model with 2C output channels")
            min_log = _extract(self.posterior_log_variance_clipped, t, x)
            max_log = _extract(torch.log(self.betas), t, x)
            frac = (var_values + 1) / 2
            return frac * max_log + (1 - frac) * min_log
        raise ValueError(f"unknown variance type {variance_type!r}")

    def p_mean_variance(
        self, pred: ModelPrediction, x_t: Tensor, t: Tensor, variance_type: VarianceType
    ) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of p_theta(x_{t-1} | x_t): the posterior mean at the predicted
        x_0 (DDPM eq. 7 with x_0 -> x0_hat, equivalent to eq. 11 for eps)."""
        mean, _, _ = self.q_posterior_mean_variance(pred.x0, x_t, t)
        return mean, self.model_log_variance(variance_type, t, x_t, pred.var_values)
