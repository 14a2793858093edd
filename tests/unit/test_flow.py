"""Flow matching's math (diffusion/flow.py) against closed forms: the optimal velocity of Gaussian data through the
flow adapter is the exact Gaussian denoiser for every output parameterisation; Euler and Heun on it give the exactly
propagated moments; Euler through the contract is Euler on dx_t/dt = v; the OT pairing is the brute-force optimum;
the time density and the shift are their formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from oracles import GaussianDenoiser

from diffusion_lightning.diffusion import sample
from diffusion_lightning.diffusion.flow import (
    FlowDenoiser,
    flow_sigma,
    flow_sigmas,
    flow_time,
    logit_normal_density,
    ot_pairing,
    sample_time,
    shift_time,
    velocity,
)

MU, S = 0.3, 0.5  # data x0 ~ N(MU, S^2 I)


def gaussian_flow_network(mu: float, s: float, prediction_type: str = "v"):
    """The optimal network for x0 ~ N(mu, s^2 I) on x_t = (1 - t) x0 + t eps: with var_t = (1 - t)^2 s^2 + t^2,
    E[x0 | x_t] = mu + (1 - t) s^2 (x_t - (1 - t) mu) / var_t and E[eps | x_t] = t (x_t - (1 - t) mu) / var_t; v* is
    their difference (called as net(x_t, 1000 t, y))."""

    def net(x_t: torch.Tensor, c_noise: torch.Tensor, y=None) -> torch.Tensor:
        t = (c_noise / 1000.0).double().reshape(-1, *[1] * (x_t.ndim - 1))
        x = x_t.double()
        var_t = (1 - t) ** 2 * s**2 + t**2
        x0 = mu + (1 - t) * s**2 * (x - (1 - t) * mu) / var_t
        eps = t * (x - (1 - t) * mu) / var_t
        out = {"v": eps - x0, "x0": x0, "eps": eps}[prediction_type]
        return out.to(x_t.dtype)

    return net


@pytest.mark.parametrize("prediction_type", ["v", "x0", "eps"])
def test_the_optimal_flow_is_the_exact_gaussian_denoiser(prediction_type):
    flow = FlowDenoiser(gaussian_flow_network(MU, S, prediction_type), prediction_type)
    exact = GaussianDenoiser(MU, S)
    x = torch.randn(64, 3, dtype=torch.float64) * 4
    for sigma in (0.01, 0.3, 1.0, 7.0, 200.0):
        torch.testing.assert_close(flow(x, sigma), exact(x, sigma), rtol=1e-9, atol=1e-9)


def test_velocity_from_every_parameterisation_agrees():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x0, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    for kind, out in (("v", eps - x0), ("x0", x0), ("eps", eps)):
        torch.testing.assert_close(velocity(out, x_t, t, kind), eps - x0)


def propagate(grid: list[float], mu: float, s: float, heun: bool) -> tuple[float, float]:
    """Mean and variance of Euler / Heun on dx/dsigma = (x - D) / sigma with the exact D(x) = a x + b, a = s^2 / (s^2 +
    sigma^2), b = mu sigma^2 / (s^2 + sigma^2), from x ~ N(0, (1 + sigma_0)^2) (the flow prior: x_t ~ N(0, I)); each
    step is an affine map x -> L x + c, the last (to 0) returns D."""

    def affine(sig: float) -> tuple[float, float]:
        return s**2 / (s**2 + sig**2), mu * sig**2 / (s**2 + sig**2)

    L, c = 1 + grid[0], 0.0  # x = L z + c, z ~ N(0, 1)
    for sig, nxt in itertools.pairwise(grid):
        a, b = affine(sig)
        if nxt == 0:
            return a * c + b, (a * L) ** 2
        h = nxt - sig
        d_l, d_c = (1 - a) / sig, -b / sig  # slope d = d_l x + d_c
        e_l, e_c = 1 + h * d_l, h * d_c  # Euler: x_next = e_l x + e_c
        if heun:
            a2, b2 = affine(nxt)
            d2_l, d2_c = (1 - a2) / nxt * e_l, ((1 - a2) * e_c - b2) / nxt  # slope at the Euler point
            e_l, e_c = 1 + h * 0.5 * (d_l + d2_l), h * 0.5 * (d_c + d2_c)
        L, c = e_l * L, e_l * c + e_c
    raise AssertionError("a grid ends with 0")


@pytest.mark.parametrize(("name", "steps", "shift"), [("euler", 5, 1.0), ("euler", 20, 3.0), ("heun", 5, 1.0),
                                                      ("heun", 10, 3.0)])  # fmt: skip
def test_euler_and_heun_on_the_optimal_flow_give_the_exact_moments(name, steps, shift):
    flow = FlowDenoiser(gaussian_flow_network(MU, S), "v", shift=shift)
    noise = torch.randn(5_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(flow, noise, name, steps=steps, clip_denoised=False)
    m, v = propagate(out.sigmas.tolist(), MU, S, heun=name == "heun")
    n = noise.numel()
    assert out.nfe == (2 * steps - 1 if name == "heun" else steps)
    assert abs(out.x.mean().item() - m) < 4 * math.sqrt(v / n)
    assert out.x.var().item() == pytest.approx(v, rel=4 * math.sqrt(2 / n))
    # the same run, deterministic: the variance follows from the noise's own (not only in expectation)
    z = noise.flatten()
    torch.testing.assert_close(out.x.flatten(), z * math.sqrt(v) + m, rtol=1e-6, atol=1e-6)


def test_euler_through_the_contract_is_euler_on_the_velocity_in_t():
    net = gaussian_flow_network(MU, S)
    flow = FlowDenoiser(net, "v", shift=2.0)
    noise = torch.randn(256, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sample(flow, noise, "euler", steps=7, clip_denoised=False)
    t = flow_time(out.sigmas)  # the t grid, from t_max down to 0
    x_t = noise * (1 + out.sigmas[0]) / (1 + out.sigmas[0])  # x_t ~ N(0, I) at t_max
    for t_i, t_next in itertools.pairwise(t.tolist()):
        x_t = x_t + (t_next - t_i) * net(x_t, torch.full((len(x_t),), 1000 * t_i, dtype=torch.float64))
    torch.testing.assert_close(out.x, x_t, rtol=1e-9, atol=1e-9)


def test_ot_pairing_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 6):
        for _ in range(5):
            x0, eps = torch.randn(n, 2, 3, generator=g), torch.randn(n, 2, 3, generator=g)
            cost = torch.cdist(x0.flatten(1).double(), eps.flatten(1).double()).square()
            best = min(sum(float(cost[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(n)))
            perm = ot_pairing(x0, eps)
            assert sorted(perm.tolist()) == list(range(n))
            assert sum(float(cost[i, perm[i]]) for i in range(n)) == pytest.approx(best, rel=1e-12)


def test_ot_pairing_shortens_the_paths_of_a_batch():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(64, 8, generator=g) + 2, torch.randn(64, 8, generator=g)
    independent = (x0 - eps).square().sum()
    paired = (x0 - eps[ot_pairing(x0, eps)]).square().sum()
    assert paired < 0.9 * independent


@pytest.mark.parametrize(("m", "s", "shift"), [(0.0, 1.0, 1.0), (-0.6, 1.0, 1.0), (-1.2, 0.8, 3.0)])
def test_training_times_follow_the_logit_normal_density_and_the_shift(m, s, shift):
    torch.manual_seed(0)
    n = 400_000
    t = sample_time(n, "logit_normal", m, s, shift).double()
    edges = torch.linspace(0, 1, 21, dtype=torch.float64)
    counts = torch.histc(t, bins=20, min=0, max=1)
    # the density of t' = shift(t): pi(t(t')) dt/dt', with t = t' / (s' - (s' - 1) t') the inverse shift
    fine = torch.linspace(1e-6, 1 - 1e-6, 200_001, dtype=torch.float64)
    inverse = fine / (shift - (shift - 1) * fine)
    jacobian = shift / (shift - (shift - 1) * fine) ** 2  # dt/dt'
    density = logit_normal_density(inverse, m, s) * jacobian
    mass = torch.stack([torch.trapezoid(density[(fine >= lo) & (fine < hi)], fine[(fine >= lo) & (fine < hi)])
                        for lo, hi in itertools.pairwise(edges.tolist())])  # fmt: skip
    expected = n * mass
    assert float(mass.sum()) == pytest.approx(1.0, abs=2e-3)
    assert torch.all((counts - expected).abs() <= 6 * expected.sqrt() + 5)


def test_uniform_times_and_the_shift_formula():
    torch.manual_seed(1)
    t = sample_time(200_000, "uniform")
    assert float(t.mean()) == pytest.approx(0.5, abs=0.003) and float(t.min()) >= 1e-5 * (1 - 1e-6)
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shift_time(u, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(shift_time(u, 1.0), u)


def test_flow_grid_is_uniform_in_t():
    grid = flow_sigmas(4, shift=1.0, t_max=0.999)
    t = flow_time(grid[:-1])
    torch.testing.assert_close(t, torch.tensor([0.999, 0.75, 0.5, 0.25], dtype=torch.float64))
    assert float(grid[-1]) == 0.0
    torch.testing.assert_close(flow_sigma(t), grid[:-1])
    shifted = flow_time(flow_sigmas(4, shift=3.0, t_max=0.999)[:-1])
    assert torch.all(shifted[1:] > t[1:])  # a shift > 1 spends the steps nearer the noise
    with pytest.raises(ValueError, match="integer"):
        FlowDenoiser(gaussian_flow_network(MU, S)).default_sigmas(None)
