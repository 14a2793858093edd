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
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        get_beta_schedule([0.1, 1.5])


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
