"""DPM-Solver++(2M) and Heun (EDM) fed the exact denoiser of Gaussian data x_0 ~ N(mu, s^2 I) of a discrete VP model
(through ``DiscreteVPDenoiser``: Heun's Karras grid is rounded to the model's timesteps by its ``round_sigma``).

With that denoiser x0_hat is affine in x, so every solver step is an affine map of the start x_T (plus
Gaussian noise for the churn variant): the output's mean and variance follow exactly. The propagation here is
written from the papers' equations, independently of the library code (only the schedule is shared).
"""

import math

import pytest
import torch
from oracles import gaussian_eps_network

from diffusion_lightning.diffusion import (
    SAMPLERS,
    DiscreteVPDenoiser,
    GaussianDiffusion,
    linear_beta_schedule,
    sample,
    space_timesteps,
)

N, D = 20_000, 8  # 160k scalar samples: standard error of the mean ~ 0.0025 s
T = 1000


def abar_table() -> list[float]:
    return torch.cumprod(1 - linear_beta_schedule(T), 0).tolist()


def x0_affine(abar: float, mu: float, s: float) -> tuple[float, float]:
    """E[x_0 | x_t] = a x_t + b for x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps (Gaussian conditioning)."""
    var_t = abar * s**2 + 1 - abar
    return math.sqrt(abar) * s**2 / var_t, mu * (1 - abar) / var_t


def propagate_ddim(steps: int, mu: float, s: float) -> tuple[float, float]:
    """DDIM eta=0 (Song et al. eq. 12): x_prev = sqrt(A_prev) x0 + sqrt(1 - A_prev) (x - sqrt(A) x0) / sqrt(1 - A)."""
    table = abar_table()
    abars = [table[t] for t in space_timesteps(T, steps)]
    L, c = 1.0, 0.0  # x = L x_T + c with x_T ~ N(0, 1)
    for i in range(len(abars) - 1, -1, -1):
        A, A_prev = abars[i], abars[i - 1] if i > 0 else 1.0
        a, b = x0_affine(A, mu, s)
        k = math.sqrt(1 - A_prev) / math.sqrt(1 - A)
        lin, off = math.sqrt(A_prev) * a + k * (1 - math.sqrt(A) * a), (math.sqrt(A_prev) - k * math.sqrt(A)) * b
        L, c = lin * L, lin * c + off
    return c, L**2


def propagate_dpmpp(steps: int, mu: float, s: float, lower_order_final: bool = True) -> tuple[float, float]:
    """DPM-Solver++(2M), Lu et al. (2022) Alg. 2, with lambda = log(alpha / sigma), a first-order first step,
    (with lower_order_final) a first-order step into the smallest timestep, and x = x0_hat at the end."""
    table = abar_table()
    ts = space_timesteps(T, steps)
    grid = [table[t] for t in reversed(ts)]  # descending noise: alpha_bar ascending
    lam = [0.5 * math.log(A / (1 - A)) for A in grid]
    L, c = 1.0, 0.0
    prev: tuple[float, float] | None = None  # x0 at the previous point, as (L, c)
    for j, A in enumerate(grid):
        a, b = x0_affine(A, mu, s)
        x0 = (a * L, a * c + b)
        if j == len(grid) - 1:
            L, c = x0
            break
        A_next = grid[j + 1]
        h = lam[j + 1] - lam[j]
        ratio, phi = math.sqrt(1 - A_next) / math.sqrt(1 - A), -math.sqrt(A_next) * (math.exp(-h) - 1)
        if prev is None or (lower_order_final and j == len(grid) - 2):
            dL, dc = x0
        else:
            r = (lam[j] - lam[j - 1]) / h
            dL = (1 + 1 / (2 * r)) * x0[0] - prev[0] / (2 * r)
            dc = (1 + 1 / (2 * r)) * x0[1] - prev[1] / (2 * r)
        L, c = ratio * L + phi * dL, ratio * c + phi * dc
        prev = x0
    return c, L**2


def heun_grid(steps: int, rho: float = 7.0) -> list[int]:
    """Karras et al. eq. 5 between sigma(0) and sigma(T-1), each snapped to the nearest timestep in log sigma."""
    sig = [math.sqrt((1 - A) / A) for A in abar_table()]
    lo, hi = sig[0] ** (1 / rho), sig[-1] ** (1 / rho)
    out: list[int] = []
    for i in range(steps):
        target = (hi + i / max(steps - 1, 1) * (lo - hi)) ** rho
        k = min(range(T), key=lambda t: abs(math.log(sig[t]) - math.log(target)))
        if not out or out[-1] != k:
            out.append(k)
    return out


def propagate_heun(steps: int, mu: float, s: float, churn: float = 0.0) -> tuple[float, float]:
    """Karras et al. Alg. 1 (Alg. 2 with churn), in x = x_vp / sqrt(abar) where D(x; sigma) = E[x_0 | x]:
    x_0 ~ N(mu, s^2) and x = x_0 + sigma n give D = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)."""
    table = abar_table()
    sig = [math.sqrt((1 - A) / A) for A in table]
    grid = heun_grid(steps)

    def den(L: float, c: float, sigma: float) -> tuple[float, float]:
        w = s**2 / (s**2 + sigma**2)
        return w * L, w * c + (1 - w) * mu

    m_scale = 1 / math.sqrt(table[grid[0]])  # x_T ~ N(0, 1) in VP space at the top timestep
    L, c, noise_var = m_scale, 0.0, 0.0  # x = L x_T + c + (independent noise of variance noise_var)
    for i, k in enumerate(grid):
        sigma = sig[k]
        if churn > 0:  # gamma = min(S_churn / N, sqrt 2 - 1); snap sigma_hat up to a timestep
            target = sigma * (1 + min(churn / len(grid), math.sqrt(2) - 1))
            k = max(k, min(range(T), key=lambda t: abs(math.log(sig[t]) - math.log(target))))
            noise_var += sig[k] ** 2 - sigma**2
            sigma = sig[k]
        w = s**2 / (s**2 + sigma**2)
        if i == len(grid) - 1:
            L, c = den(L, c, sigma)
            noise_var *= w**2
            break
        sn = sig[grid[i + 1]]
        # d = (x - D(x)) / sigma is (1 - w) / sigma * (x - mu); Euler then trapezoid, all affine in x
        dl = (1 - w) / sigma
        e = 1 + (sn - sigma) * dl  # Euler: x1 = e x + (1 - e) mu
        wn = s**2 / (s**2 + sn**2)
        dln = (1 - wn) / sn
        lin = 1 + (sn - sigma) * 0.5 * (dl + dln * e)  # x_new - mu = lin (x - mu)
        L, c, noise_var = lin * L, lin * (c - mu) + mu, lin**2 * noise_var
    return c, L**2 + noise_var


def exact_denoiser(mu: float, s: float, net_hook=None) -> DiscreteVPDenoiser:
    diffusion = GaussianDiffusion(linear_beta_schedule(T))
    net = gaussian_eps_network(diffusion, mu, s)
    return DiscreteVPDenoiser(net if net_hook is None else net_hook(net), diffusion)


def run(name: str, mu: float, s: float, seed: int = 0, **kwargs) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(N, D, generator=g, dtype=torch.float64)
    grid = "karras" if name == "heun" else "native"  # Heun's grid (conf/sampler/heun.yaml)
    return sample(exact_denoiser(mu, s), x_T, name, grid=grid, generator=g, clip_denoised=False, **kwargs).x


def assert_moments(x: torch.Tensor, m: float, v: float) -> None:
    se = math.sqrt(v / x.numel())
    assert x.mean().item() == pytest.approx(m, abs=5 * se), (x.mean().item(), m)
    assert x.var().item() == pytest.approx(v, rel=0.03), (x.var().item(), v)


def test_registered():
    from diffusion_lightning.diffusion import dpmpp_2m_sample, heun_sample, sample

    assert SAMPLERS["dpmpp"] is dpmpp_2m_sample and SAMPLERS["heun"] is heun_sample
    available = "consistency, ddim, ddpm, dpmpp, euler, heun"
    with pytest.raises(ValueError, match=f"unknown sampler 'dpm'; available: {available}"):
        sample(None, None, "dpm")


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("mu,s", [(0.5, 0.8), (-0.3, 0.4)])
def test_dpmpp_matches_exact_moments(steps, mu, s):
    x = run("dpmpp", mu, s, steps=steps)
    assert_moments(x, *propagate_dpmpp(steps, mu, s))


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("mu,s", [(0.5, 0.8), (-0.3, 0.4)])
def test_heun_matches_exact_moments(steps, mu, s):
    x = run("heun", mu, s, steps=steps)
    assert_moments(x, *propagate_heun(steps, mu, s))


def test_heun_churn_matches_exact_moments():
    x = run("heun", 0.5, 0.8, steps=10, s_churn=5.0)
    assert_moments(x, *propagate_heun(10, 0.5, 0.8, churn=5.0))


def test_dpmpp_second_order_final_step_matches_exact_moments():
    x = run("dpmpp", 0.5, 0.8, steps=20, lower_order_final=False)
    assert_moments(x, *propagate_dpmpp(20, 0.5, 0.8, lower_order_final=False))


def test_dpmpp_beats_ddim_at_20_steps():
    mu, s = 0.5, 1.0
    moments = {
        "dpmpp": propagate_dpmpp(20, mu, s),
        "dpmpp_2nd_order_final": propagate_dpmpp(20, mu, s, lower_order_final=False),
        "ddim": propagate_ddim(20, mu, s),
    }
    err = {name: abs(m - mu) + abs(math.sqrt(v) - s) for name, (m, v) in moments.items()}
    assert err["dpmpp"] < err["ddim"] / 5, err
    # why lower_order_final is on at 20 steps: a 2M step into t = 0 overshoots (see dpmpp_2m_sample)
    assert err["dpmpp_2nd_order_final"] > err["ddim"], err
    x = run("ddim", mu, s, steps=20)  # the DDIM propagation describes the library's DDIM
    assert_moments(x, *propagate_ddim(20, mu, s))


def test_nfe_and_determinism():
    calls: list[int] = []

    def recording(net):
        def net_with_log(z, t, y):
            calls.append(int(t[0]))
            return net(z, t, y)

        return net_with_log

    x_T = torch.randn(4, 3, dtype=torch.float64)
    out = sample(exact_denoiser(0.0, 1.0, recording), x_T, "heun", steps=10, grid="karras")
    assert out.nfe == len(calls) == 2 * 10 - 1 and calls[0] == T - 1 and calls[-1] == 0
    calls.clear()
    a = sample(exact_denoiser(0.0, 1.0, recording), x_T, "dpmpp", steps=10)
    assert a.nfe == len(calls) == 10 and calls == sorted(space_timesteps(T, 10), reverse=True)
    torch.testing.assert_close(a.x, sample(exact_denoiser(0.0, 1.0), x_T, "dpmpp", steps=10).x)


@pytest.mark.parametrize("name", ["dpmpp", "heun"])
def test_clipping(name):
    den = exact_denoiser(3.0, 0.5)  # data outside [-1, 1] ...
    x_T = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    assert sample(den, x_T, name, steps=10, clip_denoised=False).x.mean() > 2.5
    clipped = sample(den, x_T, name, steps=10, clip_denoised=True).x
    assert clipped.abs().max() <= 1 + 1e-5  # ... is clipped into it on request
    thresholded = sample(den, x_T, name, steps=10, threshold=0.995).x
    assert thresholded.abs().max() <= 1 + 1e-5
