"""The denoiser contract over a continuous noise level, its adapters, and the samplers on a continuous denoiser.

For data x0 ~ N(mu, s^2 I) the exact denoiser is D(x; sigma) = mu + s^2 (x - mu) / (s^2 + sigma^2). Every sampler
fed it is a chain of affine maps plus fresh Gaussian noise, so its output mean and variance follow exactly. The
propagations below are written from the papers' algorithms (Karras et al. 2022 Alg. 1-2, Lu et al. 2022 Alg. 2,
Song et al. 2021 eq. 12/16, Song et al. 2023 Alg. 1) in EDM coordinates, independently of the library's code.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracles import GaussianDenoiser, gaussian_eps_network

from diffusion_lightning.diffusion import (
    Clipped,
    Conditioned,
    ContinuousVPDenoiser,
    CosineSchedule,
    Counted,
    DiscreteVPDenoiser,
    EDMPrecond,
    GaussianDiffusion,
    cosine_beta_schedule,
    karras_sigmas,
    linear_beta_schedule,
    sample,
    sampling_sigmas,
    uniform_t_sigmas,
)

MU, S = 0.3, 0.5
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
N, D = 20_000, 8  # 160k scalars per run


def exact(sigma: float) -> float:
    """D(x; sigma) = mu + w (x - mu): the weight w."""
    return S**2 / (S**2 + sigma**2)


class Affine:
    """x = mu + a (x_start - mu) + b + n with x_start ~ N(0, sigma_max^2) and n independent noise of variance v."""

    def __init__(self, start_std: float) -> None:
        self.a, self.b, self.v, self.start_var = 1.0, 0.0, 0.0, start_std**2

    def moments(self) -> tuple[float, float]:
        # x_start - mu has mean -mu: x = mu + a (x_start - mu) + b
        return MU - self.a * MU + self.b, self.a**2 * self.start_var + self.v

    def denoised(self, sigma: float) -> Affine:
        out = Affine(0.0)
        w = exact(sigma)
        out.a, out.b, out.v, out.start_var = w * self.a, w * self.b, w**2 * self.v, self.start_var
        return out

    def combine(self, p: float, other: Affine, q: float) -> Affine:
        """p * (self - mu) + q * (other - mu) + mu, for two states driven by the same start and noise."""
        out = Affine(0.0)
        out.a, out.b = p * self.a + q * other.a, p * self.b + q * other.b
        # the noise terms are the same draws scaled: n_self = k n, so they add linearly (all our uses share one n)
        out.v = (p * math.sqrt(self.v) + q * math.sqrt(other.v)) ** 2
        out.start_var = self.start_var
        return out

    def plus_noise(self, var: float) -> Affine:
        out = Affine(0.0)
        out.a, out.b, out.v, out.start_var = self.a, self.b, self.v + var, self.start_var
        return out


def karras(n: int, rho: float = 7.0) -> list[float]:
    """Karras et al. eq. 5 (no rounding: a continuous denoiser), then 0."""
    lo, hi = SIGMA_MIN ** (1 / rho), SIGMA_MAX ** (1 / rho)
    return [(hi + i / (n - 1) * (lo - hi)) ** rho for i in range(n)] + [0.0]


def propagate_heun(grid: list[float], churn: float = 0.0) -> tuple[float, float]:
    """Alg. 1 (churn = 0) and Alg. 2: x_hat = x + sqrt(t_hat^2 - t^2) z; d = (x - D) / t; Euler, then the trapezoid
    with d' at t_next unless t_next = 0. D is affine with weight w, so d is (1 - w) / t (x - mu) and every step is
    x - mu -> lin (x - mu) (+ the churn noise before it)."""
    x = Affine(grid[0])
    n = len(grid) - 1
    gamma = min(churn / n, math.sqrt(2) - 1)
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        if churn > 0:
            t_hat = t * (1 + gamma)
            x = x.plus_noise(t_hat**2 - t**2)
            t = t_hat
        if t_next == 0:
            return x.denoised(t).moments()
        slope = (1 - exact(t)) / t  # d = slope (x - mu)
        euler = 1 + (t_next - t) * slope
        slope_next = (1 - exact(t_next)) / t_next
        lin = 1 + (t_next - t) * 0.5 * (slope + slope_next * euler)
        x = x.combine(lin, x, 0.0)
    return x.moments()


def propagate_dpmpp(grid: list[float]) -> tuple[float, float]:
    """Lu et al. (2022) Alg. 2 in sigma: x_next = (t_next / t) x - (e^{-h} - 1) D_i, h = log(t / t_next),
    D_i = x0 (first step, and the step into the last nonzero level) or (1 + 1/(2r)) x0 - 1/(2r) x0_prev,
    r = h_prev / h; the step to 0 returns x0."""
    x = Affine(grid[0])
    prev, h_prev = None, 0.0
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        x0 = x.denoised(t)
        if t_next == 0:
            return x0.moments()
        h = math.log(t / t_next)
        if prev is None or i == len(grid) - 3:
            d = x0
        else:
            r = h_prev / h
            d = x0.combine(1 + 1 / (2 * r), prev, -1 / (2 * r))
        x = x.combine(t_next / t, d, -math.expm1(-h))
        prev, h_prev = x0, h
    return x.moments()


def propagate_euler_ancestral(grid: list[float], eta: float) -> tuple[float, float]:
    """DDIM eq. 12 with eta (eq. 16) in x = z / alpha: x_next = x0 + s_down (x - x0) / t + s_up z, s_up^2 =
    eta^2 t_next^2 (t^2 - t_next^2) / t^2, s_down^2 = t_next^2 - s_up^2 (eta = 0: Euler)."""
    x = Affine(grid[0])
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        x0 = x.denoised(t)
        if t_next == 0:
            return x0.moments()
        up2 = eta**2 * t_next**2 * (t**2 - t_next**2) / t**2
        down = math.sqrt(t_next**2 - up2)
        x = x0.combine(1 - down / t, x, down / t).plus_noise(up2)
    return x.moments()


def propagate_consistency(grid: list[float]) -> tuple[float, float]:
    """Song et al. (2023) Alg. 1 with f = D: x = D(x, t_0); x = D(x + sqrt(t^2 - sigma_min^2) z, t) for later t."""
    x = Affine(grid[0]).denoised(grid[0])
    for t in grid[1:-1]:
        x = x.plus_noise(t**2 - SIGMA_MIN**2).denoised(t)
    return x.moments()


def run(name: str, sigmas: list[float] | None = None, seed: int = 0, **kwargs) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(N, D, generator=g, dtype=torch.float64)
    grid = sigmas if sigmas is not None else "native"
    out = sample(GaussianDenoiser(MU, S), noise, name, grid=grid, generator=g, clip_denoised=False, **kwargs)
    return out.x


def assert_moments(x: torch.Tensor, m: float, v: float) -> None:
    se = math.sqrt(v / x.numel())
    assert x.mean().item() == pytest.approx(m, abs=5 * se), (x.mean().item(), m)
    assert x.var().item() == pytest.approx(v, rel=0.03), (x.var().item(), v)


# --------------------------------------------------------------------------------------- samplers on continuous D
@pytest.mark.parametrize("steps", [5, 18])
def test_heun_on_a_continuous_denoiser_matches_exact_moments_without_snapping(steps):
    seen: list[float] = []

    class Recording(GaussianDenoiser):
        def predict(self, x, sigma, y=None):
            seen.append(float(sigma))
            return super().predict(x, sigma, y)

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(N, D, generator=g, dtype=torch.float64)
    out = sample(Recording(MU, S), noise, "heun", steps=steps, grid="karras", generator=g, clip_denoised=False)
    assert_moments(out.x, *propagate_heun(karras(steps)))
    # the denoiser was asked at the Karras sigmas themselves (and Heun's second evaluations at the next ones)
    expected = karras(steps)
    assert seen[0] == pytest.approx(SIGMA_MAX, rel=1e-12) and out.nfe == len(seen) == 2 * steps - 1
    assert seen[::2] == pytest.approx(expected[:-1], rel=1e-12)
    torch.testing.assert_close(out.sigmas, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_heun_churn_on_a_continuous_denoiser_matches_exact_moments():
    grid = karras(10)
    x = run("heun", grid, s_churn=4.0)
    assert_moments(x, *propagate_heun(grid, churn=4.0))
    assert propagate_heun(grid, churn=4.0)[1] != pytest.approx(propagate_heun(grid)[1], rel=0.05)  # churn shows


@pytest.mark.parametrize("steps", [8, 20])
def test_dpmpp_on_a_continuous_denoiser_matches_exact_moments(steps):
    grid = karras(steps)
    assert_moments(run("dpmpp", grid), *propagate_dpmpp(grid))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_euler_and_ddim_eta_on_a_continuous_denoiser_match_exact_moments(eta):
    grid = karras(12)
    assert_moments(run("ddim", grid, eta=eta), *propagate_euler_ancestral(grid, eta))


@pytest.mark.parametrize("grid", [[SIGMA_MAX], [SIGMA_MAX, 0.8], [SIGMA_MAX, 2.0, 0.3]])
def test_consistency_sampler_matches_exact_moments(grid):
    x = run("consistency", grid)
    assert_moments(x, *propagate_consistency([*grid, 0.0]))


def test_the_exact_consistency_function_gives_the_data_in_one_step():
    """f*(x, sigma) = mu + (x - mu) sqrt((s^2 + smin^2) / (s^2 + sigma^2)) maps N(mu, s^2 + sigma^2) to
    N(mu, s^2 + smin^2); one step from the prior N(0, sigma_max^2) is near it, a second step through 0.5 nearer."""

    class ConsistencyFn(GaussianDenoiser):
        def predict(self, x, sigma, y=None):
            return MU + (x - MU) * math.sqrt((S**2 + SIGMA_MIN**2) / (S**2 + float(sigma) ** 2)), None

    g = torch.Generator().manual_seed(1)
    noise = torch.randn(N, D, generator=g, dtype=torch.float64)
    one = sample(ConsistencyFn(MU, S), noise, "consistency", steps=1, generator=g, clip_denoised=False)
    assert one.nfe == 1 and one.sigmas.tolist() == [SIGMA_MAX, 0.0]
    two = sample(ConsistencyFn(MU, S), noise, "consistency", grid=[SIGMA_MAX, 0.5], generator=g, clip_denoised=False)
    assert two.nfe == 2
    for x in (one.x, two.x):
        assert x.std().item() == pytest.approx(math.sqrt(S**2 + SIGMA_MIN**2), rel=0.02)
    assert abs(two.x.mean().item() - MU) < abs(one.x.mean().item() - MU) + 0.01  # the prior's mean error shrinks


# --------------------------------------------------------------------------------------- EDM preconditioning
def exact_edm_network(precond: EDMPrecond):
    """F* with D = c_skip x + c_out F*: F*(c_in x, c_noise) = (D*(x) - c_skip x) / c_out, sigma read back from
    c_noise = 1000 ln(sigma) / 4 and x from c_in x."""

    def net(x_in: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        sigma = torch.exp(c_noise / 250.0)
        x = x_in * (sigma**2 + precond.sigma_data**2).sqrt()[:, None]
        c_skip, c_out, _, _ = precond.coefficients(sigma)
        d = MU + S**2 * (x - MU) / (S**2 + sigma[:, None] ** 2)
        return (d - c_skip[:, None] * x) / c_out[:, None]

    return net


@pytest.mark.parametrize("boundary", [False, True])
def test_edm_precond_around_the_exact_network_reproduces_d(boundary):
    precond = EDMPrecond(None, sigma_data=0.5, boundary_condition=boundary)
    precond.net = exact_edm_network(precond)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    for sigma in (0.01, 0.3, 1.0, 7.0, 80.0):
        torch.testing.assert_close(precond(x, sigma), GaussianDenoiser(MU, S)(x, sigma), rtol=1e-10, atol=1e-10)
    per_sample = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0, 2.0, 0.05], dtype=torch.float64)
    torch.testing.assert_close(precond(x, per_sample), GaussianDenoiser(MU, S)(x, per_sample), rtol=1e-10, atol=1e-10)


def test_edm_coefficients_match_their_closed_forms():
    sd, smin = 0.5, 0.002
    sigma = torch.tensor([0.002, 0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    plain = EDMPrecond(None, sigma_data=sd).coefficients(sigma)
    cm = EDMPrecond(None, sigma_data=sd, sigma_min=smin, boundary_condition=True).coefficients(sigma)
    for i, s in enumerate(sigma.tolist()):
        assert plain[0][i].item() == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-12)
        assert plain[1][i].item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert plain[2][i].item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert plain[3][i].item() == pytest.approx(1000 * math.log(s) / 4, rel=1e-12)
        assert cm[0][i].item() == pytest.approx(sd**2 / ((s - smin) ** 2 + sd**2), rel=1e-12)
        assert cm[1][i].item() == pytest.approx((s - smin) * sd / math.sqrt(s**2 + sd**2), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_condition_gives_d_of_sigma_min_equal_x_exactly(dtype):
    """c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly, so D(x, sigma_min) = x bit for bit, whatever the
    network says (here a random linear map with large outputs)."""
    weight = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=dtype) * 100

    def net(x_in, c_noise, y):
        return x_in @ weight + c_noise[:, None]

    precond = EDMPrecond(net, sigma_min=0.002, boundary_condition=True)
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)
    assert torch.equal(precond(x, 0.002), x)
    assert torch.equal(precond(x, torch.full((9,), 0.002, dtype=dtype)), x)
    assert not torch.equal(EDMPrecond(net, sigma_min=0.002)(x, 0.002), x)  # EDM's own c_skip(sigma_min) < 1
    assert not torch.equal(precond(x, 0.0021), x)


# --------------------------------------------------------------------------------------- continuous VP adapter
def exact_vp_network(schedule: CosineSchedule, prediction_type: str, time_input: str):
    """The exact eps / x0 / v network of a continuous VP model on N(mu, s^2): it reads sigma back from its time
    input (t = input / 1000, sigma = tan(a t + b); or sigma = exp(-logsnr / 2)) and x from z = x / sqrt(1 + sigma^2)."""

    def net(z: torch.Tensor, c: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        sigma = (schedule.sigma(c / 1000.0) if time_input == "t" else torch.exp(-c / 2)).to(z.dtype)[:, None]
        alpha, sigma_vp = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
        x = z / alpha
        x0 = MU + S**2 * (x - MU) / (S**2 + sigma**2)
        eps = (x - x0) / sigma
        return {"eps": eps, "x0": x0, "v": alpha * eps - sigma_vp * x0}[prediction_type]

    return net


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("time_input", ["t", "logsnr"])
def test_continuous_vp_adapter_around_the_exact_network_reproduces_d(prediction_type, time_input):
    schedule = CosineSchedule()
    den = ContinuousVPDenoiser(exact_vp_network(schedule, prediction_type, time_input), schedule,
                               prediction_type, time_input)  # fmt: skip
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    for sigma in (1e-3, 0.1, 1.0, 10.0, 300.0):
        torch.testing.assert_close(den(x, sigma), GaussianDenoiser(MU, S)(x, sigma), rtol=1e-8, atol=1e-8)
    assert den.prior_std(3.0) == pytest.approx(math.sqrt(10.0))
    assert (den.sigma_min, den.sigma_max) == pytest.approx((math.exp(-10), math.exp(10)), rel=1e-9)  # tan near pi/2


def test_cosine_schedule_and_its_uniform_t_grid():
    """alpha_t = cos(a t + b), sigma_vp = sin(a t + b) (the truncated cos(pi t / 2) of progressive distillation):
    sigma = tan(a t + b); the log-SNR runs from logsnr_max at t = 0 to logsnr_min at t = 1."""
    schedule = CosineSchedule(-20.0, 20.0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    sigma = schedule.sigma(t)
    torch.testing.assert_close(schedule.t(sigma), t, rtol=0, atol=1e-12)
    logsnr = -2 * sigma.log()
    assert logsnr[0].item() == pytest.approx(20.0) and logsnr[-1].item() == pytest.approx(-20.0)
    untruncated = CosineSchedule(-200.0, 200.0)  # a = pi / 2, b = 0: alpha = cos(pi t / 2) exactly
    for ti in (0.1, 0.5, 0.9):
        s = untruncated.sigma(ti).item()
        assert 1 / math.sqrt(1 + s**2) == pytest.approx(math.cos(math.pi * ti / 2), rel=1e-12)
        assert s / math.sqrt(1 + s**2) == pytest.approx(math.sin(math.pi * ti / 2), rel=1e-12)
    grid = uniform_t_sigmas(schedule, 4)
    torch.testing.assert_close(grid, torch.cat([schedule.sigma(torch.tensor([1.0, 0.75, 0.5, 0.25])),
                                                torch.zeros(1, dtype=torch.float64)]))  # fmt: skip


def test_ddim_on_the_continuous_vp_adapter_matches_exact_moments():
    """DDIM through the uniform-t grid of a v-prediction continuous model, started from its VP prior."""
    schedule = CosineSchedule()
    den = ContinuousVPDenoiser(exact_vp_network(schedule, "v", "t"), schedule)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(N, D, generator=g, dtype=torch.float64)
    out = sample(den, noise, "ddim", steps=16, generator=g, clip_denoised=False)
    grid = out.sigmas.tolist()
    assert out.nfe == 16 and grid[0] == pytest.approx(math.exp(10))
    moments = Affine(math.sqrt(1 + grid[0] ** 2))
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        x0 = moments.denoised(t)
        moments = x0 if t_next == 0 else x0.combine(1 - t_next / t, moments, t_next / t)
    assert_moments(out.x, *moments.moments())


# --------------------------------------------------------------------------------------- discrete VP adapter
def test_discrete_adapter_rounds_sigma_to_its_levels_and_is_the_exact_denoiser_there():
    diffusion = GaussianDiffusion(cosine_beta_schedule(1000))
    den = DiscreteVPDenoiser(gaussian_eps_network(diffusion, MU, S), diffusion)
    levels = ((1 - diffusion.alphas_cumprod) / diffusion.alphas_cumprod).sqrt()
    assert (den.sigma_min, den.sigma_max) == pytest.approx((levels[0].item(), levels[-1].item()), rel=1e-12)
    # nearest level in log sigma
    between = (levels[10] * levels[11]).sqrt() * 1.001
    assert den.round_sigma(between.reshape(1)).item() == pytest.approx(levels[11].item(), rel=1e-12)
    assert den.round_sigma(torch.tensor([1e-9, 1e9], dtype=torch.float64)).tolist() == pytest.approx(
        [levels[0].item(), levels[-1].item()], rel=1e-12)  # fmt: skip
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (0, 10, 500, 999):
        torch.testing.assert_close(den(x, levels[t].item()), GaussianDenoiser(MU, S)(x, levels[t].item()))
    assert den.prior_std(2.0) == pytest.approx(math.sqrt(5.0))
    # its own grid is the respaced timesteps' sigmas; the Karras grid is rounded onto the levels
    assert sampling_sigmas(den, 4).tolist() == pytest.approx([*levels[[999, 666, 333, 0]].tolist(), 0.0], rel=1e-12)
    # the Karras grid rounded to the nearest levels in log sigma, repeats dropped: on the cosine schedule's last,
    # widely spaced levels (641.7 -> 20291) the 2nd and 3rd Karras sigmas (5215, 965) both round to 641.7
    raw = karras_sigmas(6, den.sigma_min, den.sigma_max).tolist()
    nearest = [min(levels.tolist(), key=lambda lv, r=r: abs(math.log(lv) - math.log(r))) for r in raw]
    expected = [v for i, v in enumerate(nearest) if i == 0 or v != nearest[i - 1]]
    assert len(expected) == 5
    assert sampling_sigmas(den, 6, "karras").tolist() == pytest.approx([*expected, 0.0], rel=1e-12)


def test_wrappers_count_clip_and_bind_labels():
    seen = []

    class Labelled(GaussianDenoiser):
        def predict(self, x, sigma, y=None):
            seen.append(y)
            return super().predict(x, sigma, y)

    inner = Labelled(3.0, 0.1)  # data far outside [-1, 1]
    x = torch.full((4, 2), 3.0, dtype=torch.float64)
    counted = Counted(Conditioned(Clipped(inner), torch.arange(4)))
    assert counted(x, 1.0).max().item() == 1.0 and counted.nfe == 1
    assert torch.equal(seen[-1], torch.arange(4))
    counted(x, 1.0, torch.zeros(4, dtype=torch.long))  # an explicit y wins
    assert counted.nfe == 2 and torch.equal(seen[-1], torch.zeros(4, dtype=torch.long))
    assert (counted.sigma_min, counted.sigma_max, counted.learned_variance) == (inner.sigma_min, inner.sigma_max, False)
    thresholded = Clipped(inner, threshold=1.0)(x, 0.01)  # dynamic: divide by max |x0| = 3
    torch.testing.assert_close(thresholded, inner(x, 0.01) / inner(x, 0.01).abs().max())


def test_sample_entry_rejects_unknown_options_and_grids():
    den = GaussianDenoiser(MU, S)
    noise = torch.randn(2, 3)
    with pytest.raises(ValueError, match="sampler 'ddim' has no option variance_type"):
        sample(den, noise, "ddim", steps=4, variance_type="fixed_large")
    with pytest.raises(ValueError, match="unknown grid"):
        sample(den, noise, "ddim", steps=4, grid="cosine")
    with pytest.raises(ValueError, match="strictly descending"):
        sample(den, noise, "consistency", grid=[1.0, 5.0])
    with pytest.raises(ValueError, match="learned-variance"):
        sample(den, noise, "ddpm", steps=4, variance_type="learned_range")
    diffusion = GaussianDiffusion(linear_beta_schedule(1000))
    with pytest.raises(ValueError, match="integer number of steps"):
        sample(DiscreteVPDenoiser(gaussian_eps_network(diffusion, 0, 1), diffusion), noise, "heun", steps="ddim10",
               grid="karras")  # fmt: skip
