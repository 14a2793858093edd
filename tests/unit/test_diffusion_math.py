"""The diffusion math against closed forms: schedules, q_sample, posterior, parameterisations."""

import math

import pytest
import torch

from diffusion_lightning.diffusion import (
    GaussianDiffusion,
    cosine_beta_schedule,
    get_beta_schedule,
    linear_beta_schedule,
    space_timesteps,
)


def test_linear_schedule_closed_form():
    betas = linear_beta_schedule(1000)
    assert betas.dtype == torch.float64 and len(betas) == 1000
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(betas, 1e-4 + t * (0.02 - 1e-4) / 999)


@pytest.mark.parametrize("T", [50, 250, 4000])
def test_linear_schedule_scales_with_T_as_the_improved_ddpm_code(T):
    """beta from 1e-4 * 1000/T to 0.02 * 1000/T (``get_named_beta_schedule("linear", T)``), so the chain still ends
    in noise: log alpha_bar_T is -11.8 at T = 50, -10.3 at 250 and -10.1 at 1000 and 4000, where the unscaled ends
    would leave -0.5 at T = 50; explicit ends are kept as given."""
    betas = linear_beta_schedule(T)
    scale = 1000 / T
    t = torch.arange(T, dtype=torch.float64)
    torch.testing.assert_close(betas, scale * (1e-4 + t * (0.02 - 1e-4) / (T - 1)))
    log_abar_T = torch.log1p(-betas).sum().item()
    reference = torch.log1p(-linear_beta_schedule(1000)).sum().item()
    assert log_abar_T == pytest.approx(reference, rel=0.2)
    unscaled = torch.log1p(-linear_beta_schedule(T, 1e-4, 0.02)).sum().item()
    assert abs(unscaled - reference) > 5 * abs(log_abar_T - reference)
    assert linear_beta_schedule(T, 1e-4, 0.02)[-1].item() == pytest.approx(0.02)
    assert get_beta_schedule("linear", T)[0].item() == pytest.approx(1e-4 * scale)


def test_cosine_schedule_closed_form():
    T, s = 4000, 0.008
    betas = cosine_beta_schedule(T)
    abar = torch.cumprod(1 - betas, 0)

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    # iDDPM eq. 17: alpha_bar_t = f(t) / f(0), where the 0.999 clip is not active.
    for t in [1, 10, 500, 2000, 3900]:
        assert abar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999)  # the clip at the end
    assert (betas[:-1] < 0.999).sum() > 3990


def test_user_schedule_and_errors():
    assert get_beta_schedule([0.1, 0.2]).tolist() == [0.1, 0.2]
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        get_beta_schedule([0.1, 1.5])


def reference_space_timesteps(num_timesteps: int, section_counts: list[int]) -> set[int]:
    """The improved-DDPM reference (``respace.py``), transcribed: a float position advanced by the fractional stride
    and rounded (round-half-even) at each step."""
    size_per, extra = num_timesteps // len(section_counts), num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_space_timesteps_keeps_the_reference_timesteps_for_every_count(T):
    for n in range(1, T + 1):
        assert space_timesteps(T, n) == sorted(reference_space_timesteps(T, [n])), n
    for sections in ([10, 15, 25], [25, 15, 10], [3, 1, 7, 2]):
        if max(sections) > T // len(sections):
            continue
        got = space_timesteps(T, ",".join(map(str, sections)))
        assert got == sorted(reference_space_timesteps(T, sections)), sections


def test_space_timesteps_accumulates_the_stride():
    """T = 50, 25 steps: at j = 12 the stride 49/24 accumulated in floating point reaches 24.500000000000004 and
    rounds to 25 (the reference's timestep), where 12 * 49 / 24 = 24.5 exactly rounds (half to even) to 24."""
    kept = space_timesteps(50, 25)
    position, accumulated = 0.0, []
    for _ in range(25):
        accumulated.append(round(position))
        position += 49 / 24
    assert kept == accumulated
    assert kept != [round(j * 49 / 24) for j in range(25)]  # the rule before this fix


def test_space_timesteps():
    assert space_timesteps(1000, 10) == [round(i * 999 / 9) for i in range(10)]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    two_sections = space_timesteps(50, 10) + [50 + t for t in space_timesteps(50, 5)]
    assert space_timesteps(100, "10,5") == sorted(set(two_sections))
    assert len(space_timesteps(4000, 25)) == 25
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


def test_q_sample_marginal_moments():
    diffusion = GaussianDiffusion(linear_beta_schedule(1000))
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    for t in [0, 100, 500, 999]:
        tt = torch.full((len(x0),), t)
        xt = diffusion.q_sample(x0, tt, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        abar = torch.prod(1 - linear_beta_schedule(1000)[: t + 1]).item()
        se = math.sqrt((1 - abar) / len(x0))
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=5 * se)
        assert xt.var().item() == pytest.approx(1 - abar, rel=0.02)


def test_posterior_matches_bayes():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): product of two Gaussians in x_{t-1}."""
    betas = cosine_beta_schedule(50)
    diffusion = GaussianDiffusion(betas)
    abar = torch.cumprod(1 - betas, 0)
    x0 = torch.tensor([[0.3], [-0.8], [1.0]], dtype=torch.float64)
    xt = torch.tensor([[1.2], [0.1], [-0.5]], dtype=torch.float64)
    for t in [1, 7, 49]:
        # q(x_t | x_{t-1}) = N(sqrt(1-b) x_{t-1}, b): as a density in x_{t-1}: precision (1-b)/b.
        b = betas[t]
        prec_lik, mean_lik = (1 - b) / b, xt / torch.sqrt(1 - b)
        prec_prior, mean_prior = 1 / (1 - abar[t - 1]), torch.sqrt(abar[t - 1]) * x0
        var = 1 / (prec_lik + prec_prior)
        mean = var * (prec_lik * mean_lik + prec_prior * mean_prior)
        m, v, log_v = diffusion.q_posterior_mean_variance(x0, xt, torch.full((3,), t))
        torch.testing.assert_close(m, mean)
        torch.testing.assert_close(v, var.expand_as(v))
        torch.testing.assert_close(log_v, torch.log(var).expand_as(v))
    # at t = 0 the posterior is a point mass at x_0; the log-variance is clipped to beta~_1
    m, v, log_v = diffusion.q_posterior_mean_variance(x0, xt, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(m, x0)
    assert (v == 0).all() and torch.allclose(log_v, torch.log(diffusion.posterior_variance[1]).expand_as(log_v))


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_parameterisations_round_trip(prediction_type):
    diffusion = GaussianDiffusion(linear_beta_schedule(1000))
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    xt = diffusion.q_sample(x0, t, eps)
    target = diffusion.training_target(x0, eps, t, prediction_type)
    pred = diffusion.prediction_from_output(target, xt, t, prediction_type)
    torch.testing.assert_close(pred.x0, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(pred.eps, eps, atol=2e-3, rtol=1e-3)


def test_learned_output_split_and_variance_range():
    diffusion = GaussianDiffusion(linear_beta_schedule(100))
    x = torch.zeros(2, 3, 2, 2)
    t = torch.tensor([0, 50])
    out = torch.cat([torch.zeros_like(x), torch.full_like(x, 1.0)], 1)  # v = 1 -> frac 1 -> beta_t
    pred = diffusion.prediction_from_output(out, x, t, "eps")
    log_var = diffusion.model_log_variance("learned_range", t, x, pred.var_values)
    torch.testing.assert_close(log_var[1], torch.log(diffusion.betas[50]).float().expand_as(log_var[1]))
    with pytest.raises(ValueError, match="channels"):
        diffusion.prediction_from_output(torch.zeros(2, 4, 2, 2), x, t, "eps")


def test_respace_keeps_alphas_cumprod():
    base = GaussianDiffusion(linear_beta_schedule(1000))
    keep = space_timesteps(1000, 50)
    sub = base.respace(keep)
    torch.testing.assert_close(sub.alphas_cumprod, base.alphas_cumprod[keep])
    assert sub.timesteps.tolist() == keep
