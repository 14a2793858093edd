"""Ancestral (DDPM) and DDIM samplers: small pure functions over a denoiser (k-diffusion style), and the
helpers every sampler shares. The ODE solvers are in :mod:`.solvers`; :mod:`.registry` names them all.

Every sampler has the signature ``sampler(denoiser, diffusion, x_T, *, steps, ..., generator)``
and returns x_0. ``steps`` picks the timesteps (see :func:`space_timesteps`); the sampler runs
the respaced process, calling the denoiser with the training process's timesteps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .gaussian import Denoiser, GaussianDiffusion, ModelPrediction, VarianceType
from .schedules import space_timesteps

Progress = Callable[[Iterable[int]], Iterable[int]]


def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Saharia et al. (2022, Imagen) Sec. 2.3: s = max(1, quantile_p |x_0|) per sample, then
    clip to [-s, s] and divide by s."""
    s = torch.quantile(x0.flatten(1).abs().float(), percentile, dim=1).to(x0.dtype)
    s = s.clamp(min=1.0).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def process_prediction(
    pred: ModelPrediction,
    diffusion: GaussianDiffusion,
    x_t: Tensor,
    i: Tensor,
    clip_denoised: bool,
    threshold: float | None,
) -> ModelPrediction:
    """Clip (to [-1, 1]) or dynamically threshold the predicted x_0 and recompute eps from it."""
    if threshold is not None:
        x0 = dynamic_threshold(pred.x0, threshold)
    elif clip_denoised:
        x0 = pred.x0.clamp(-1, 1)
    else:
        return pred
    return ModelPrediction(x0, diffusion.predict_eps_from_x0(x_t, i, x0), pred.var_values)


def respaced(diffusion: GaussianDiffusion, steps: int | str | None) -> GaussianDiffusion:
    """The process a sampler runs for ``steps`` (None: all of them)."""
    if steps is None or (isinstance(steps, int) and steps == diffusion.num_timesteps):
        return diffusion
    return diffusion.respace(space_timesteps(diffusion.num_timesteps, steps))


def _denoise(
    denoiser: Denoiser, process: GaussianDiffusion, x: Tensor, i: int, clip: bool, threshold: float | None
) -> tuple[ModelPrediction, Tensor]:
    idx = torch.full((x.shape[0],), i, dtype=torch.long)
    t_model = process.timesteps[idx].to(x.device)
    pred = denoiser(x, t_model)
    return process_prediction(pred, process, x, idx, clip, threshold), idx


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Noise drawn on the generator's device (a CPU generator can drive a GPU sampler)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def ddpm_sample(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    *,
    steps: int | str | None = None,
    variance_type: VarianceType = "fixed_small",
    clip_denoised: bool = True,
    threshold: float | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Ancestral sampling, DDPM Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, no noise at
    the last step. ``variance_type`` fixed_small is sigma^2 = beta~_t, fixed_large sigma^2 = beta_t
    (DDPM Sec. 3.2), learned_range uses the model's variance (iDDPM eq. 15)."""
    process = respaced(diffusion, steps)
    x = x_T
    indices: Iterable[int] = range(process.num_timesteps - 1, -1, -1)
    for i in progress(indices) if progress else indices:
        pred, idx = _denoise(denoiser, process, x, i, clip_denoised, threshold)
        mean, log_var = process.p_mean_variance(pred, x, idx, variance_type)
        x = mean + (0.5 * log_var).exp() * _randn_like(x, generator) if i > 0 else mean
    return x


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    *,
    steps: int | str | None = 50,
    eta: float = 0.0,
    clip_denoised: bool = True,
    threshold: float | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """DDIM, Song et al. (2021) eq. 12 on the respaced process:
    x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps_hat + sigma_t z,
    sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}) (eq. 16).
    eta = 0 is deterministic; eta = 1 is DDPM ancestral with fixed_small variance."""
    process = respaced(diffusion, steps)
    x = x_T
    indices: Iterable[int] = range(process.num_timesteps - 1, -1, -1)
    for i in progress(indices) if progress else indices:
        pred, _ = _denoise(denoiser, process, x, i, clip_denoised, threshold)
        abar = float(process.alphas_cumprod[i])
        abar_prev = float(process.alphas_cumprod_prev[i])
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
        x = abar_prev**0.5 * pred.x0 + max(1 - abar_prev - sigma**2, 0.0) ** 0.5 * pred.eps
        if sigma > 0 and i > 0:
            x = x + sigma * _randn_like(x, generator)
    return x
