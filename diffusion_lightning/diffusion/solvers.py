"""ODE solvers for the probability-flow ODE of a discrete-time VP model.

Both samplers follow the signature of :mod:`diffusion_lightning.diffusion.samplers`
(``f(denoiser, diffusion, x_T, *, steps, clip_denoised, threshold, generator, progress) -> x_0``), take
x_T ~ N(0, I) as the VP marginal at the last training timestep, and end with x = x0_hat at the smallest
timestep they visit (DDIM's convention of a final step to alpha_bar = 1).

* :func:`dpmpp_2m_sample`: DPM-Solver++(2M), Lu et al. (2022) "DPM-Solver++", Algorithm 2.
* :func:`heun_sample`: the EDM sampler, Karras et al. (2022) "Elucidating the design space...", Algorithms 1-2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from .gaussian import Denoiser, GaussianDiffusion
from .samplers import Progress, _denoise, _randn_like, process_prediction, respaced


@torch.no_grad()
def dpmpp_2m_sample(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    *,
    steps: int | str | None = 20,
    lower_order_final: bool = True,
    clip_denoised: bool = True,
    threshold: float | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep second-order solver in data prediction.

    With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t) and
    h_i = lambda_{t_i} - lambda_{t_{i-1}}, each step from s to t is (their eq. 8 / Alg. 2)::

        x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D,
        D   = x0(s)                                           (first order = DDIM),
        D   = (1 + 1 / (2 r)) x0(s) - 1 / (2 r) x0(s_prev),   r = h_prev / h   (second order).

    Runs the ``respaced(diffusion, steps)`` process: one model call per kept timestep (NFE = number of
    steps). The first step is first order (no history). The last step goes from the smallest kept timestep
    to alpha_bar = 1 (lambda = +inf, h = inf): it is necessarily first order and returns x0_hat there, which
    is DDIM's last step and the reference's ``denoise_to_zero``. With ``lower_order_final`` the step *into* the
    smallest kept timestep -- the reference code's final solver step -- is first order too, for every number of
    steps (the reference and diffusers lower it only below 10 / 15 steps; diffusers' ``euler_at_final`` does it
    always). Reason: evenly spaced timesteps end with a long jump in lambda (20 of 1000 linear-schedule steps:
    lambda 1.7 -> 4.6 after steps of ~0.6, so r ~ 0.2 and the 2M extrapolation weight 1 / (2r) ~ 2.2); on exact
    Gaussian data N(0.5, 1) a second-order final step leaves the output std at 1.115 (DDIM: 0.908), a first-order
    one at 1.0005 (tests/test_solvers.py).
    """
    process = respaced(diffusion, steps)
    n = process.num_timesteps
    abar = process.alphas_cumprod
    lam = [0.5 * math.log(float(abar[i]) / (1.0 - float(abar[i]))) for i in range(n)]
    x = x_T
    x0_prev: Tensor | None = None  # x0 prediction at the previous (noisier) timestep
    indices: Iterable[int] = range(n - 1, -1, -1)
    for i in progress(indices) if progress else indices:
        pred, _ = _denoise(denoiser, process, x, i, clip_denoised, threshold)
        if i == 0:  # step to abar = 1: sigma_t = 0, exp(-h) = 0, so x_t = x0_hat
            x = pred.x0
            break
        a_s, a_t = float(abar[i]), float(abar[i - 1])
        alpha_t, sigma_s, sigma_t = math.sqrt(a_t), math.sqrt(1.0 - a_s), math.sqrt(1.0 - a_t)
        h = lam[i - 1] - lam[i]
        first_order = x0_prev is None or (lower_order_final and i == 1)
        if first_order:
            d = pred.x0
        else:
            r = (lam[i] - lam[i + 1]) / h
            d = (1.0 + 0.5 / r) * pred.x0 - (0.5 / r) * x0_prev
        x = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * d
        x0_prev = pred.x0
    return x


def vp_sigmas(diffusion: GaussianDiffusion) -> Tensor:
    """sigma(t) = sqrt((1 - abar_t) / abar_t) (float64, ascending in t): the noise level of x / sqrt(abar)
    (Karras et al. 2022, Table 1, VP with s(t) = sqrt(abar))."""
    abar = diffusion.alphas_cumprod
    return ((1.0 - abar) / abar).sqrt()


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho,
    i = 0..n-1 (descending, float64; no trailing zero)."""
    if n < 1:
        raise ValueError("need at least one sigma")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def nearest_timesteps(sigmas: Tensor, diffusion: GaussianDiffusion) -> Tensor:
    """Index of the timestep of ``diffusion`` whose sigma is nearest to each of ``sigmas`` in log sigma."""
    log_table = vp_sigmas(diffusion).log()
    return (sigmas.to(torch.float64).log()[:, None] - log_table[None, :]).abs().argmin(dim=1)


def heun_timesteps(diffusion: GaussianDiffusion, steps: int, rho: float = 7.0) -> Tensor:
    """The timesteps (descending indices into ``diffusion``) visited by :func:`heun_sample`: the Karras
    grid between sigma(0) and sigma(T-1), snapped to the nearest timesteps, duplicates removed."""
    table = vp_sigmas(diffusion)
    karras = karras_sigmas(steps, float(table[0]), float(table[-1]), rho)
    return torch.unique_consecutive(nearest_timesteps(karras, diffusion))


@torch.no_grad()
def heun_sample(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    *,
    steps: int | None = 18,
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    clip_denoised: bool = True,
    threshold: float | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Heun's second-order method of Karras et al. (2022), Alg. 1 (``s_churn=0``) / Alg. 2 (``s_churn>0``).

    The ODE is dx/dsigma = (x - D(x; sigma)) / sigma in EDM space x = x_vp / sqrt(abar), sigma =
    sqrt((1 - abar) / abar), with D(x; sigma) = x0_hat(x sqrt(abar), t(sigma)). ``steps`` is the number of
    nonzero sigmas N (NFE = 2N - 1: the last step, to sigma = 0, is Euler and returns x0_hat).

    Grid: Karras sigmas (eq. 5, ``rho``) between sigma_min = sigma(0) and sigma_max = sigma(T-1) of the
    training schedule, each snapped to the model timestep nearest in log sigma, and the integration uses the
    snapped sigma(t) itself -- a discrete-time model is only defined at its integer timesteps, and the
    :data:`Denoiser` contract takes integer timesteps, so we move the grid rather than interpolate t. Snapped
    duplicates (only possible for very large N) are dropped. x_T ~ N(0, I) is the VP marginal at T-1, so the
    solver starts from x_T / sqrt(abar_{T-1}) (variance 1 + sigma_max^2 rather than EDM's sigma_max^2; the
    same start as DDPM/DDIM). With ``s_churn > 0`` (Alg. 2) sigma_hat = sigma_i (1 + gamma_i) is also snapped
    (to a timestep with sigma >= sigma_i) and exactly sigma_hat^2 - sigma_i^2 of fresh noise is added.
    """
    if steps is None:
        steps = 18
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"heun needs an integer number of sigmas >= 1, got {steps!r}")
    table = vp_sigmas(diffusion)
    idxs = heun_timesteps(diffusion, steps, rho).tolist()
    n = len(idxs)

    def denoise(x: Tensor, k: int) -> Tensor:  # D(x; sigma_k) in EDM space
        idx = torch.full((x.shape[0],), k, dtype=torch.long)
        scale = float(diffusion.sqrt_alphas_cumprod[k])
        x_vp = x * scale
        pred = denoiser(x_vp, diffusion.timesteps[idx].to(x.device))
        return process_prediction(pred, diffusion, x_vp, idx, clip_denoised, threshold).x0

    x = x_T / float(diffusion.sqrt_alphas_cumprod[idxs[0]])
    gamma_max = min(s_churn / n, math.sqrt(2.0) - 1.0)
    loop: Iterable[int] = range(n)
    for i in progress(loop) if progress else loop:
        k = idxs[i]
        sigma = float(table[k])
        if s_churn > 0 and s_tmin <= sigma <= s_tmax:  # Alg. 2 lines 4-6: raise the noise level to sigma_hat
            target = torch.tensor([sigma * (1.0 + gamma_max)], dtype=torch.float64)
            k = max(int(nearest_timesteps(target, diffusion)), k)
            sigma_hat = float(table[k])
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * _randn_like(x, generator)
            sigma = sigma_hat
        x0 = denoise(x, k)
        if i == n - 1:  # sigma_next = 0: Euler, x + (0 - sigma) d = D(x; sigma)
            x = x0
            break
        d = (x - x0) / sigma  # eq. 3 / Alg. 1 line 4
        k_next = idxs[i + 1]
        sigma_next = float(table[k_next])
        x_next = x + (sigma_next - sigma) * d  # Alg. 1 line 5
        d_next = (x_next - denoise(x_next, k_next)) / sigma_next  # Alg. 1 lines 7-8: trapezoidal correction
        x = x + (sigma_next - sigma) * 0.5 * (d + d_next)
    return x
