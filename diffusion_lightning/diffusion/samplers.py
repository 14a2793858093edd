"""One sampler family over the denoiser contract (k-diffusion's ``sampling.py`` style).

Every sampler is ``f(denoiser, x, sigmas, *, generator=None, progress=None, **options) -> x0``: ``x`` is the start
at ``sigmas[0]`` (prior noise, already scaled by the caller), ``sigmas`` the descending grid ending with 0
(:mod:`.grids`), and D(x, sigma) = x0_hat for x = x0 + sigma eps (:mod:`.denoisers`). A sampler never builds a grid,
rounds a sigma it was given, or knows what network stands behind D; with N nonzero sigmas each costs N network
evaluations (Heun: 2N - 1), counted by :func:`~.sampling.sample`.

For a VP model x = z / alpha (z the VP state, alpha^2 = alpha_bar = 1 / (1 + sigma^2)); in these coordinates DDIM
is Euler on the probability-flow ODE dx/dsigma = (x - D) / sigma, the DDPM posterior mean is
x0 + (sigma_next / sigma)^2 (x - x0), and DPM-Solver++ steps with lambda = -log sigma.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .denoisers import Denoiser
from .gaussian import VarianceType

Progress = Callable[[Iterable[int]], Iterable[int]]


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Noise drawn on the generator's device (a CPU generator can drive a GPU sampler)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _steps(sigmas: Tensor, progress: Progress | None) -> Iterable[int]:
    indices = range(len(sigmas) - 1)
    return progress(indices) if progress else indices


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of a step sigma -> sigma_next that adds fresh noise sigma_up and keeps the marginal:
    sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)), sigma_down =
    sqrt(sigma_next^2 - sigma_up^2). sigma_up / sqrt(1 + sigma_next^2) is DDIM's sigma_t (Song et al. 2021, eq. 16)."""
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 with sigma_t of eq. 16): x_next = x0 + sigma_down eps_hat + sigma_up z with
    eps_hat = (x - x0) / sigma (:func:`ancestral_step`). eta = 0 is deterministic: Euler on the probability-flow ODE
    (Karras et al. 2022, eq. 3); eta = 1 is ancestral DDPM with the fixed_small variance. The step to 0 returns x0."""
    for i in _steps(sigmas, progress):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, sigma)
        if sigma_next == 0:
            return x0
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = x0 + down * (x - x0) / sigma
        if up > 0:
            x = x + up * randn_like(x, generator)
    return x


@torch.no_grad()
def euler_sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D) / sigma (Karras et al. 2022, eq. 3): DDIM at eta = 0,
    under the name flow-matching users know (on a flow model it is Euler on dx_t/dt = v, :mod:`.flow`)."""
    return ddim_sample(denoiser, x, sigmas, eta=0.0, generator=generator, progress=progress)


@torch.no_grad()
def ddpm_sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    variance_type: VarianceType | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Ancestral sampling of the VP chain through the grid (DDPM Algorithm 2; iDDPM Sec. 4 for a respaced chain).

    Between levels sigma > sigma_next: alpha_bar = 1 / (1 + sigma^2), beta = 1 - alpha_bar / alpha_bar_next and
    beta~ = beta (1 - alpha_bar_next) / (1 - alpha_bar) (DDPM eq. 7). The posterior mean at x0_hat is
    x0 + (sigma_next / sigma)^2 (x - x0) and the variance, in x = z / alpha, is Sigma / alpha_bar_next with Sigma =
    beta~ (``fixed_small``), beta (``fixed_large``, DDPM Sec. 3.2) or exp(frac log beta + (1 - frac) log beta~) with
    frac = (v + 1) / 2 from the model (``learned_range``, iDDPM eq. 15). None: the denoiser's own
    (``variance_type``), else learned_range for a learned-variance denoiser and fixed_small otherwise. The step to 0
    returns x0 (no noise)."""
    if variance_type is None:
        variance_type = denoiser.variance_type or ("learned_range" if denoiser.learned_variance else "fixed_small")
    if variance_type not in ("fixed_small", "fixed_large", "learned_range"):
        raise ValueError(f"unknown variance_type {variance_type!r}: use fixed_small, fixed_large or learned_range")
    if variance_type == "learned_range" and not denoiser.learned_variance:
        raise ValueError("variance_type=learned_range needs a learned-variance model (2C output channels)")
    for i in _steps(sigmas, progress):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0, v = denoiser.predict(x, sigma)
        if sigma_next == 0:
            return x0
        mean = x0 + (sigma_next / sigma) ** 2 * (x - x0)
        # In x: beta~ / alpha_bar_next = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 (DDIM's eta = 1 noise) and
        # beta / alpha_bar_next = (sigma^2 - sigma_next^2) (1 + sigma_next^2) / (1 + sigma^2).
        log_small = math.log(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        log_large = math.log((sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2))
        if variance_type == "learned_range":
            frac = (v + 1) / 2
            log_var: Tensor | float = frac * log_large + (1 - frac) * log_small
        else:
            log_var = log_small if variance_type == "fixed_small" else log_large
        x = mean + torch.as_tensor(log_var, dtype=x.dtype, device=x.device).mul(0.5).exp() * randn_like(x, generator)
    return x


@torch.no_grad()
def dpmpp_2m_sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    lower_order_final: bool = True,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep second order in data prediction.

    With lambda = -log sigma (= log(alpha / sigma_vp)) and h = lambda_next - lambda, each step is
    x_next = (sigma_next / sigma) x - expm1(-h) D with D = x0 (first order: DDIM) or
    D = (1 + 1 / (2 r)) x0 - 1 / (2 r) x0_prev, r = h_prev / h (second order). The first step has no history; the step
    to 0 returns x0 (the reference's ``denoise_to_zero``). With ``lower_order_final`` the step *into* the smallest
    nonzero sigma is first order too, for every number of steps (the reference and diffusers lower it only below 10 /
    15 steps): evenly spaced timesteps end with a long jump in lambda (20 of 1000 linear-schedule steps: r ~ 0.2, an
    extrapolation weight 1 / (2r) ~ 2.2); on exact Gaussian data N(0.5, 1) a second-order final step leaves the output
    std at 1.115 (DDIM: 0.908), a first-order one at 1.0005 (tests/unit/test_samplers_higher_order.py)."""
    n = len(sigmas) - 1
    x0_prev: Tensor | None = None
    h_prev = 0.0
    for i in _steps(sigmas, progress):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, sigma)
        if sigma_next == 0:
            return x0
        h = math.log(sigma) - math.log(sigma_next)
        if x0_prev is None or (lower_order_final and i == n - 2):
            d = x0
        else:
            r = h_prev / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (sigma_next / sigma) * x - math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def heun_sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Heun's second-order method of Karras et al. (2022), Alg. 1 (``s_churn=0``) and Alg. 2 (``s_churn>0``).

    d = (x - D(x; sigma)) / sigma (eq. 3); an Euler step to sigma_next is corrected with the slope there (trapezoid);
    the step to 0 is Euler and returns x0, so N nonzero sigmas cost 2N - 1 evaluations. With churn, sigma_hat =
    sigma (1 + gamma), gamma = min(s_churn / N, sqrt(2) - 1) for s_tmin <= sigma <= s_tmax, is rounded to a level of
    the denoiser not below sigma (EDM's ``round_sigma``: the identity for a continuous model) and exactly
    sigma_hat^2 - sigma^2 of fresh noise (times s_noise^2) is added."""
    n = len(sigmas) - 1
    gamma = min(s_churn / n, math.sqrt(2.0) - 1.0)
    for i in _steps(sigmas, progress):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if s_churn > 0 and s_tmin <= sigma <= s_tmax:  # Alg. 2 lines 4-6
            raised = torch.tensor([sigma * (1.0 + gamma)], dtype=torch.float64)
            sigma_hat = max(float(denoiser.round_sigma(raised)[0]), sigma)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * randn_like(x, generator)
            sigma = sigma_hat
        x0 = denoiser(x, sigma)
        if sigma_next == 0:
            return x0
        d = (x - x0) / sigma
        x_next = x + (sigma_next - sigma) * d
        d_next = (x_next - denoiser(x_next, sigma_next)) / sigma_next
        x = x + (sigma_next - sigma) * 0.5 * (d + d_next)
    return x


@torch.no_grad()
def consistency_sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): x <- D(x, sigma_0), then at each further level
    x <- D(x + sqrt(sigma^2 - sigma_min^2) z, sigma). The grid [sigma_max, 0] is one-step generation."""
    for i in _steps(sigmas, progress):
        sigma = float(sigmas[i])
        if i > 0:
            x = x + math.sqrt(sigma**2 - denoiser.sigma_min**2) * randn_like(x, generator)
        x = denoiser(x, sigma)
    return x
