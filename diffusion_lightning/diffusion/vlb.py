"""The variational bound of a Gaussian diffusion model in bits per dimension.

Ho et al. (2020) eq. 5 splits the negative ELBO into L_T + sum_{t>1} L_{t-1} + L_0; Nichol &
Dhariwal (2021, "iDDPM") write the same bound as L_vlb = L_0 + L_1 + ... + L_T (eq. 4-7) with

    L_T     = KL(q(x_T | x_0) || N(0, I))                              (prior, no parameters)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))      (Gaussian KLs)
    L_0     = -log p_theta(x_0 | x_1)                                  (discretised decoder)

Steps are 0-based as in the code: the input x_t at process step t > 0 gives the Gaussian term
for the transition to step t - 1, and step 0 (the paper's x_1 -> x_0) is the decoder term L_0.
Every term is averaged over dimensions and divided by log 2 (bits/dim), as in iDDPM's NLLs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor

from .denoisers import Clipped, Denoiser
from .gaussian import GaussianDiffusion, ModelPrediction, PredictionType, VarianceType, _extract
from .losses import mean_flat

LossType = Literal["hybrid", "vlb", "simple"]
Progress = Callable[[Iterable[int]], Iterable[int]]

_LOG2 = math.log(2.0)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats.

    0.5 * (log s2^2/s1^2 + s1^2/s2^2 + (m1 - m2)^2/s2^2 - 1), the closed form behind the Gaussian
    terms L_{t-1} of DDPM eq. 5 / iDDPM eq. 6.
    """
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF used by DDPM/iDDPM's code:
    0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Evaluated as sigmoid(2 y), which is the same function but keeps relative precision in the
    left tail (1 + tanh(y) cancels there). It is odd-symmetric, cdf(-x) = 1 - cdf(x), monotone and
    runs from 0 to 1, so the bin probabilities built from it form a proper distribution.
    """
    return torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) in nats for data on 256 levels in [-1, 1] under N(means, exp(log_scales)^2).

    DDPM eq. 13: each level x owns the interval [x - 1/255, x + 1/255]; the lowest (x = -1) and
    highest (x = 1) bins extend to -inf and +inf. Uses :func:`approx_standard_normal_cdf` (the
    reference code's tanh approximation, not the exact erf CDF), so numbers are comparable with
    published bits/dim. The bin masses telescope to exactly 1 for any mean and scale; probabilities
    are floored at 1e-12 before the log, as in the reference.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    cdf_upper = approx_standard_normal_cdf(upper)
    one_minus_cdf_lower = approx_standard_normal_cdf(-lower)
    # Interior bins: cdf(upper) - cdf(lower). Right of the mean use the mirrored difference
    # cdf(-lower) - cdf(-upper) (equal by symmetry) so both tails avoid 1 - 1 cancellation.
    delta = torch.where(
        centered > 0,
        one_minus_cdf_lower - approx_standard_normal_cdf(-upper),
        cdf_upper - approx_standard_normal_cdf(lower),
    )
    floor = 1e-12
    return torch.where(
        x < -0.999,
        torch.log(cdf_upper.clamp(min=floor)),
        torch.where(x > 0.999, torch.log(one_minus_cdf_lower.clamp(min=floor)), torch.log(delta.clamp(min=floor))),
    )


def vlb_terms(
    diffusion: GaussianDiffusion,
    pred: ModelPrediction,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    variance_type: VarianceType,
) -> Tensor:
    """Per-sample term L_t of the bound in bits/dim, shape (B,).

    ``pred`` is the model's prediction for the input x_t at (0-based) process step t.
    t > 0: KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) (iDDPM eq. 6, DDPM eq. 5);
    t = 0: -log p_theta(x_0 | x_1) of the discretised Gaussian decoder (iDDPM eq. 7, DDPM eq. 13),
    with mean and log-variance from ``p_mean_variance`` and log-scale = log_var / 2.
    """
    mean, log_var = diffusion.p_mean_variance(pred, x_t, t, variance_type)
    kl = _kl_bpd(diffusion, mean, log_var, x0, x_t, t)
    return torch.where(t.to(kl.device) == 0, _decoder_bpd(mean, log_var, x0), kl)


def _kl_bpd(diffusion: GaussianDiffusion, mean: Tensor, log_var: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """KL(q(x_{t-1} | x_t, x_0) || N(mean, exp(log_var))) averaged over dims, in bits."""
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
    return mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / _LOG2


def _decoder_bpd(mean: Tensor, log_var: Tensor, x0: Tensor) -> Tensor:
    """-log p(x0) under the discretised N(mean, exp(log_var)) averaged over dims, in bits."""
    return -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / _LOG2


def prior_bpd(diffusion: GaussianDiffusion, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim per sample (DDPM eq. 5; constant in theta)."""
    t = torch.full((x0.shape[0],), diffusion.num_timesteps - 1, dtype=torch.long)
    mean, _, log_var = diffusion.q_mean_variance(x0, t)
    zero = torch.zeros_like(mean)
    return mean_flat(normal_kl(mean, log_var, zero, zero)) / _LOG2


def hybrid_loss(
    diffusion: GaussianDiffusion,
    model_output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    noise: Tensor,
    prediction_type: PredictionType = "eps",
    lambda_vlb: float = 0.001,
    loss_type: LossType = "hybrid",
    variance_type: VarianceType = "learned_range",
) -> dict[str, Tensor]:
    """Per-sample training losses of iDDPM Sec. 3.1 for a network output of C or 2C channels.

    Returns ``loss`` (what to minimise, before any importance weights), ``mse`` (L_simple, DDPM
    eq. 14 for the chosen target) and ``vlb`` (the single term L_t in bits/dim), each of shape (B,).

    * ``"simple"``: loss = mse.
    * ``"hybrid"``: loss = mse + lambda_vlb * T * vlb, with L_t computed from a prediction whose
      mean channels are detached, so L_vlb only trains the variance channels (iDDPM eq. 16 and the
      stop-gradient of Sec. 3.1). With uniform t, T * L_t is an unbiased estimate of
      L_vlb = sum_t L_t, so this is L_simple + lambda L_vlb. For lambda_vlb = 0.001 it equals the
      reference code's ``mse + vb * T / 1000`` ("rescaled" MSE, vb in bits/dim).
    * ``"vlb"``: loss = T * vlb, gradients through mean and variance: again the unbiased estimate
      of the whole bound for uniform t (the reference's rescaled KL loss). With importance
      sampling of t the caller multiplies by the sampler's weights 1 / (T p_t).

    ``learned_range`` needs a 2C-channel output (mean, then v); a fixed ``variance_type`` a C-channel one. For
    ``"simple"`` the returned ``vlb`` is a detached diagnostic.
    """
    if loss_type not in ("hybrid", "vlb", "simple"):
        raise ValueError(f"unknown loss_type {loss_type!r}: use 'hybrid', 'vlb' or 'simple'")
    channels = x_t.shape[1]
    learned = variance_type == "learned_range"
    if model_output.shape[1] != (2 if learned else 1) * channels:
        raise ValueError(f"a {variance_type} model needs {(2 if learned else 1) * channels} output channels, "
                         f"got {model_output.shape[1]}")
    mean_out = model_output[:, :channels]
    target = diffusion.training_target(x0, noise, t, prediction_type)
    mse = mean_flat((target - mean_out) ** 2)

    num_timesteps = diffusion.num_timesteps
    if loss_type == "vlb":
        pred = diffusion.prediction_from_output(model_output, x_t, t, prediction_type)
        vb = vlb_terms(diffusion, pred, x0, x_t, t, variance_type)
        return {"loss": vb * num_timesteps, "mse": mse.detach(), "vlb": vb}

    # Stop-gradient on the mean (iDDPM Sec. 3.1): L_vlb reaches only the variance channels.
    frozen = torch.cat([mean_out.detach(), model_output[:, channels:]], dim=1) if learned else mean_out.detach()
    with torch.set_grad_enabled(torch.is_grad_enabled() and loss_type == "hybrid"):
        pred = diffusion.prediction_from_output(frozen, x_t, t, prediction_type)
        vb = vlb_terms(diffusion, pred, x0, x_t, t, variance_type)
    if loss_type == "simple":
        return {"loss": mse, "mse": mse, "vlb": vb.detach()}
    # lambda * (T * L_t) with vb in bits/dim. For lambda = 1e-3 this is the reference code's hybrid,
    # which scales its vb term by T / 1000 so that at T = 1000 it matches its earlier, unscaled sum.
    return {"loss": mse + lambda_vlb * num_timesteps * vb, "mse": mse, "vlb": vb}


def predict(denoiser: Denoiser, diffusion: GaussianDiffusion, x_t: Tensor, t: Tensor) -> ModelPrediction:
    """The denoiser's prediction for the VP state x_t at process steps t (B,): it is called at
    x = x_t / sqrt(alpha_bar_t) and sigma_t (a respaced process's sigma_t is that of its training timestep)."""
    x0, var_values = denoiser.predict(x_t * _extract(diffusion.sqrt_recip_alphas_cumprod, t, x_t), diffusion.sigmas[t])
    return ModelPrediction(x0, diffusion.predict_eps_from_x0(x_t, t, x0), var_values)


@torch.no_grad()
def calc_bpd_loop(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    x0: Tensor,
    variance_type: VarianceType,
    clip_denoised: bool = False,
    progress: Progress | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Evaluate every term of the bound for one batch x0 in [-1, 1] (iDDPM Sec. 2, eq. 4-7).

    For each step t = T-1 .. 0 draws x_t ~ q(x_t | x_0) with fresh noise and asks the denoiser at sigma_t (so a
    respaced ``diffusion`` evaluates the bound of the shorter chain); ``clip_denoised`` clips x0_hat to [-1, 1]
    as the samplers do. Returns per-sample ``total_bpd`` = sum_t L_t + L_T and ``prior_bpd`` (B,), and ``vb``,
    ``xstart_mse``, ``mse`` (eps error) of shape (B, T), indexed by process step.
    """
    denoiser = Clipped(denoiser) if clip_denoised else denoiser
    batch, num_timesteps = x0.shape[0], diffusion.num_timesteps
    vb = torch.zeros(batch, num_timesteps, device=x0.device, dtype=x0.dtype)
    xstart_mse, mse = torch.zeros_like(vb), torch.zeros_like(vb)
    indices: Iterable[int] = range(num_timesteps - 1, -1, -1)
    for i in progress(indices) if progress else indices:
        idx = torch.full((batch,), i, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = diffusion.q_sample(x0, idx, noise)
        pred = predict(denoiser, diffusion, x_t, idx)
        mean, log_var = diffusion.p_mean_variance(pred, x_t, idx, variance_type)
        # vlb_terms for a batch at one step: evaluate only the term that applies.
        vb[:, i] = _kl_bpd(diffusion, mean, log_var, x0, x_t, idx) if i > 0 else _decoder_bpd(mean, log_var, x0)
        xstart_mse[:, i] = mean_flat((pred.x0 - x0) ** 2)
        mse[:, i] = mean_flat((pred.eps - noise) ** 2)
    prior = prior_bpd(diffusion, x0)
    return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb, "xstart_mse": xstart_mse, "mse": mse}


@torch.no_grad()
def calc_bpd_stratified(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    x0: Tensor,
    variance_type: VarianceType,
    num_strata: int,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """An unbiased, cheaper estimate of :func:`calc_bpd_loop`'s ``total_bpd``.

    L_T and the decoder term L_0 are computed exactly; sum_{t=1}^{T-1} L_t is estimated by
    splitting [1, T) into ``num_strata`` equal strata and drawing one t per stratum and sample:
    sum_k |stratum_k| L_{t_k}. Costs ``num_strata + 1`` network calls per image instead of T.
    """
    denoiser = Clipped(denoiser) if clip_denoised else denoiser
    batch, num_timesteps = x0.shape[0], diffusion.num_timesteps
    bounds = torch.linspace(1, num_timesteps, min(num_strata, num_timesteps - 1) + 1).round().long()
    total = prior_bpd(diffusion, x0).to(x0.device)
    strata = [(0, 1)] + list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
    for lo, hi in strata:
        offset = torch.randint(0, hi - lo, (batch,), generator=generator)
        idx = lo + offset
        noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator else x0.device)
        x_t = diffusion.q_sample(x0, idx, noise.to(device=x0.device, dtype=x0.dtype))
        pred = predict(denoiser, diffusion, x_t, idx)
        total = total + (hi - lo) * vlb_terms(diffusion, pred, x0, x_t, idx, variance_type)
    return {"total_bpd": total}


__all__ = [
    "approx_standard_normal_cdf",
    "calc_bpd_loop",
    "calc_bpd_stratified",
    "discretized_gaussian_log_likelihood",
    "hybrid_loss",
    "normal_kl",
    "predict",
    "prior_bpd",
    "vlb_terms",
]
