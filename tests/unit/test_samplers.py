"""Samplers fed the exact denoiser of Gaussian data x_0 ~ N(mu, s^2 I), through the denoiser contract.

The exact eps-prediction network of a discrete VP model is wrapped in ``DiscreteVPDenoiser`` (the adapter every
DDPM checkpoint samples through), so the adapter and the samplers are both under test. With that denoiser every
sampler step is an affine map of x_t plus Gaussian noise, so the mean and variance of the sampler's output can be
propagated exactly, step by step. The propagation below is written from the papers' equations (in the VP
coordinates of DDPM / DDIM), independently of the library's coefficients and of its sigma-space formulation.
"""

import math

import pytest
import torch
from oracles import gaussian_eps_network

from diffusion_lightning.diffusion import (
    DiscreteVPDenoiser,
    GaussianDiffusion,
    cosine_beta_schedule,
    dynamic_threshold,
    linear_beta_schedule,
    sample,
    space_timesteps,
)

N, D = 10_000, 8  # 80k scalar samples: standard error of the mean ~ 0.0035 s, of the variance ~ 0.5%


def exact_affine(abar: float, mu: float, s: float) -> tuple[float, float, float, float]:
    """x0_hat = a x + b and eps_hat = c x + d for the exact denoiser at alpha_bar = abar."""
    var_t = abar * s**2 + 1 - abar
    a, b = math.sqrt(abar) * s**2 / var_t, mu * (1 - abar) / var_t
    c, d = math.sqrt(1 - abar) / var_t, -math.sqrt(1 - abar) * math.sqrt(abar) * mu / var_t
    return a, b, c, d


def propagate_ddpm(abars: list[float], mu: float, s: float, variance: str | float) -> tuple[float, float]:
    """DDPM eq. 7 with x0 -> x0_hat; sigma^2 = beta~_t (fixed_small), beta_t (fixed_large), or for a float
    ``frac`` the learned range of iDDPM eq. 15, beta_t^frac beta~_t^(1 - frac), all of the (respaced) chain."""
    m, v = 0.0, 1.0
    for i in range(len(abars) - 1, -1, -1):
        A, A_prev = abars[i], abars[i - 1] if i > 0 else 1.0
        beta = 1 - A / A_prev
        coef1 = beta * math.sqrt(A_prev) / (1 - A)
        coef2 = (1 - A_prev) * math.sqrt(1 - beta) / (1 - A)
        a, b, _, _ = exact_affine(A, mu, s)
        lin = coef1 * a + coef2
        m, v = lin * m + coef1 * b, lin**2 * v
        if i > 0:
            beta_tilde = beta * (1 - A_prev) / (1 - A)
            frac = {"fixed_small": 0.0, "fixed_large": 1.0}.get(variance, variance)
            v += beta**frac * beta_tilde ** (1 - frac)
    return m, v


def propagate_ddim(abars: list[float], mu: float, s: float, eta: float) -> tuple[float, float]:
    """DDIM eq. 12 with sigma from eq. 16."""
    m, v = 0.0, 1.0
    for i in range(len(abars) - 1, -1, -1):
        A, A_prev = abars[i], abars[i - 1] if i > 0 else 1.0
        sigma2 = eta**2 * (1 - A_prev) / (1 - A) * (1 - A / A_prev)
        k = math.sqrt(max(1 - A_prev - sigma2, 0.0))
        a, b, c, d = exact_affine(A, mu, s)
        lin = math.sqrt(A_prev) * a + k * c
        m, v = lin * m + math.sqrt(A_prev) * b + k * d, lin**2 * v
        if i > 0:
            v += sigma2
    return m, v


SCHEDULES = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule}


def exact_denoiser(diffusion: GaussianDiffusion, mu: float, s: float) -> DiscreteVPDenoiser:
    return DiscreteVPDenoiser(gaussian_eps_network(diffusion, mu, s), diffusion)


def run(name: str, mu: float, s: float, seed: int = 0, schedule: str = "linear", **kwargs) -> torch.Tensor:
    diffusion = GaussianDiffusion(SCHEDULES[schedule](1000))
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(N, D, generator=g, dtype=torch.float64)
    out = sample(exact_denoiser(diffusion, mu, s), x_T, name, generator=g, clip_denoised=False, **kwargs)
    return out.x


def abars_for(steps: int | str, schedule: str = "linear") -> list[float]:
    abar = torch.cumprod(1 - SCHEDULES[schedule](1000).double(), 0)
    return [abar[t].item() for t in space_timesteps(1000, steps)]


def assert_moments(x: torch.Tensor, m: float, v: float) -> None:
    se = math.sqrt(v / x.numel())
    assert x.mean().item() == pytest.approx(m, abs=5 * se), (x.mean().item(), m)
    assert x.var().item() == pytest.approx(v, rel=0.03), (x.var().item(), v)


@pytest.mark.parametrize("mu,s", [(0.5, 1.0), (-0.3, 0.4)])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_1000_matches_exact_moments(mu, s, variance):
    x = run("ddpm", mu, s, variance_type=variance)
    m, v = propagate_ddpm(abars_for(1000), mu, s, variance)
    assert_moments(x, m, v)


def test_ddpm_1000_recovers_data_for_unit_scale():
    mu, s = 0.5, 1.0
    x = run("ddpm", mu, s, seed=3)
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(s, rel=0.02)


@pytest.mark.parametrize("steps", [50, 10])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_exact_moments(steps, eta):
    mu, s = 0.5, 0.8
    x = run("ddim", mu, s, steps=steps, eta=eta)
    m, v = propagate_ddim(abars_for(steps), mu, s, eta)
    assert_moments(x, m, v)


def test_ddim_eta0_is_deterministic_and_ddpm_respaced_matches():
    a = run("ddim", 0.0, 1.0, seed=1, steps=10)
    b = run("ddim", 0.0, 1.0, seed=1, steps=10)
    torch.testing.assert_close(a, b)
    x = run("ddpm", 0.2, 0.6, steps=25)
    m, v = propagate_ddpm(abars_for(25), 0.2, 0.6, "fixed_small")
    assert_moments(x, m, v)


@pytest.mark.parametrize("steps", [1000, 50, "ddim50"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_on_the_cosine_schedule_matches_exact_moments(steps, variance):
    """The cosine schedule's last step (beta clipped at 0.999, alpha_bar_999 = 2.4e-9) and its large
    respaced first step must not bias the chain."""
    mu, s = 0.2, 0.6
    x = run("ddpm", mu, s, schedule="cosine", steps=steps, variance_type=variance)
    m, v = propagate_ddpm(abars_for(steps, "cosine"), mu, s, variance)
    assert_moments(x, m, v)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("v_out", [-1.0, 0.3, 1.0])
def test_learned_range_variance_on_a_respaced_chain_matches_exact_moments(v_out, schedule):
    """A 2C-output model whose variance channel says v: with 25 respaced steps the sampler must
    interpolate between the *respaced* chain's beta and beta~ (iDDPM eq. 15 and Sec. 4)."""
    mu, s = 0.2, 0.6
    diffusion = GaussianDiffusion(SCHEDULES[schedule](1000))
    eps_net = gaussian_eps_network(diffusion, mu, s)

    def net(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:  # 2C outputs: eps, then v
        return torch.cat([eps_net(z, t, y), torch.full_like(z, v_out)], dim=1)

    denoiser = DiscreteVPDenoiser(net, diffusion, learned_variance=True)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(N, D, generator=g, dtype=torch.float64)
    x = sample(denoiser, x_T, "ddpm", steps=25, generator=g, clip_denoised=False).x  # learned_range by default
    m, v = propagate_ddpm(abars_for(25, schedule), mu, s, (v_out + 1) / 2)
    assert_moments(x, m, v)
    # the respaced beta and beta~ differ enough at 25 steps for the three cases to be told apart
    lo, hi = (propagate_ddpm(abars_for(25, schedule), mu, s, frac)[1] for frac in (0.0, 1.0))
    assert hi / lo > 1.1


def test_clipping_and_dynamic_threshold():
    x0 = torch.tensor([[0.5, -0.2, 3.0, -4.0], [0.1, 0.2, -0.3, 0.4]])
    out = dynamic_threshold(x0, percentile=1.0)
    torch.testing.assert_close(out[0], x0[0] / 4.0)  # s = max |x0| = 4 -> rescaled into [-1, 1]
    torch.testing.assert_close(out[1], x0[1])  # s clamps at 1: already in range, unchanged
    x = run("ddim", 3.0, 0.5, steps=10)  # data outside [-1, 1] ...
    den = exact_denoiser(GaussianDiffusion(linear_beta_schedule(1000)), 3.0, 0.5)
    clipped = sample(den, torch.randn(100, 4), "ddim", steps=10, clip_denoised=True).x
    assert x.mean() > 2.5 and clipped.abs().max() <= 1 + 1e-5  # ... is clipped into it on request


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler"):
        run("euler-maruyama", 0.0, 1.0)
