"""The variational bound (bits/dim), the hybrid loss and the importance sampler against closed forms.

Reference quantities (Gaussian KLs, reverse variances, discrete entropies) are written from the
papers' equations with abar = alpha_bar only, independently of the library's coefficients.
"""

import io
import math

import numpy as np
import pytest
import torch
from oracles import gaussian_eps_network
from scipy import integrate, stats

from diffusion_lightning.diffusion import DiscreteVPDenoiser, GaussianDiffusion, ModelPrediction
from diffusion_lightning.diffusion.importance import LossSecondMomentResampler, UniformSampler
from diffusion_lightning.diffusion.schedules import linear_beta_schedule
from diffusion_lightning.diffusion.vlb import (
    approx_standard_normal_cdf,
    calc_bpd_loop,
    calc_bpd_stratified,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    normal_kl,
    predict,
    prior_bpd,
    vlb_terms,
)

LOG2 = math.log(2.0)
CENTRES = torch.linspace(-1, 1, 256, dtype=torch.float64)  # x = -1 + 2k/255


def linear_process(T: int = 1000) -> GaussianDiffusion:
    return GaussianDiffusion(linear_beta_schedule(T))


def abar_of(d: GaussianDiffusion) -> torch.Tensor:
    return torch.cumprod(1 - linear_beta_schedule(d.num_timesteps), 0)


# ----------------------------------------------------------------------------- KL and likelihood
@pytest.mark.parametrize(
    "m1,lv1,m2,lv2", [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.5, 0.5), (2.0, 1.2, 0.0, -0.7), (-1.0, -6.0, -1.01, -5.0)]
)
def test_normal_kl_matches_numerical_integral(m1, lv1, m2, lv2):
    s1, s2 = math.exp(0.5 * lv1), math.exp(0.5 * lv2)

    def integrand(x: float) -> float:  # p1 log(p1 / p2)
        return stats.norm.pdf(x, m1, s1) * (stats.norm.logpdf(x, m1, s1) - stats.norm.logpdf(x, m2, s2))

    expected, _ = integrate.quad(integrand, m1 - 30 * s1, m1 + 30 * s1, points=[m1], epsabs=1e-13, limit=200)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = normal_kl(t(m1), t(lv1), t(m2), t(lv2)).item()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_approx_cdf_is_close_to_erf_and_symmetric():
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    exact = torch.from_numpy(stats.norm.cdf(x.numpy()))
    approx = approx_standard_normal_cdf(x)
    assert (approx - exact).abs().max() < 2e-4  # the tanh approximation's accuracy
    torch.testing.assert_close(approx_standard_normal_cdf(-x), 1 - approx, rtol=0, atol=1e-15)
    assert approx_standard_normal_cdf(torch.tensor(-10.0, dtype=torch.float64)) > 1e-40  # no 1 - 1 cancellation


@pytest.mark.parametrize(
    "mean,log_scale",
    [(0.0, 0.0), (0.3, -3.0), (-0.99, -6.0), (0.5, 4.0), (5.0, 1.0), (-20.0, -1.0), (1.0, -9.0), (0.2, -12.0)],
)
def test_discretized_likelihood_is_a_distribution(mean, log_scale):
    for dtype, atol in [(torch.float64, 1e-6), (torch.float32, 1e-5)]:
        x = CENTRES.to(dtype)
        logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
        assert torch.isfinite(logp).all() and (logp <= 1e-6).all()
        assert logp.double().exp().sum().item() == pytest.approx(1.0, abs=atol)


def test_discretized_likelihood_bins_and_tails():
    k = 100
    x = CENTRES
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, x[k].item()), torch.full_like(x, math.log(1e-4)))
    assert logp[k].exp().item() == pytest.approx(1.0, abs=1e-9)  # all mass in the bin around the mean
    # Edge bins extend to infinity: a mean far beyond +1 puts all mass on x = 1.
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, 3.0), torch.full_like(x, -2.0))
    assert logp[-1].exp().item() == pytest.approx(1.0, abs=1e-9)
    # Mirror symmetry holds in both tails, far past where 1 - cdf would round to 0.
    m, ls = torch.full_like(x, 0.1), torch.full_like(x, math.log(0.05))
    torch.testing.assert_close(
        discretized_gaussian_log_likelihood(x, m, ls), discretized_gaussian_log_likelihood(-x, -m, ls)
    )
    # A wide Gaussian: interior bins carry ~ density * bin width (exact erf check, tanh-approx tolerance).
    wide = discretized_gaussian_log_likelihood(
        x[1:-1], torch.zeros(254, dtype=torch.float64), torch.zeros(254, dtype=torch.float64)
    )
    density = stats.norm.pdf(x[1:-1].numpy()) * 2 / 255
    np.testing.assert_allclose(wide.exp().numpy(), density, rtol=2e-3)


# ----------------------------------------------------------------------------- vlb terms
def test_exact_posterior_gives_zero_kl_terms():
    d = linear_process()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.randint(1, 1000, (64,), generator=g)
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    pred = ModelPrediction(x0, d.predict_eps_from_x0(x_t, t, x0))
    assert vlb_terms(d, pred, x0, x_t, t, "fixed_small").abs().max() < 1e-6
    # learned_range with v = -1 is the lower end of iDDPM eq. 15, beta~_t: the same model.
    pred.var_values = -torch.ones_like(x0)
    assert vlb_terms(d, pred, x0, x_t, t, "learned_range").abs().max() < 1e-6
    # t = 0 is the decoder term: -log p(x0 | x1) / log 2, averaged over dims.
    t0 = torch.zeros(64, dtype=torch.long)
    mean, log_var = d.p_mean_variance(pred, x_t, t0, "fixed_small")
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / LOG2
    torch.testing.assert_close(vlb_terms(d, pred, x0, x_t, t0, "fixed_small"), nll)


def optimal_reverse_variance(abar: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For x0 ~ N(mu, s^2): Var[x_{t-1} | x_t] = beta~_t + coef1_t^2 Var[x0 | x_t] (DDPM eq. 6-7 averaged
    over the Gaussian posterior of x0). Returns (that variance, beta~_t, beta_t) for 0-based steps."""
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    beta = 1 - abar / abar_prev
    beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    coef1 = abar_prev.sqrt() * beta / (1 - abar)
    var_x0 = s**2 * (1 - abar) / (abar * s**2 + 1 - abar)
    return beta_tilde + coef1**2 * var_x0, beta_tilde, beta


def exact_denoiser(d: GaussianDiffusion, mu: float, s: float) -> DiscreteVPDenoiser:
    """The exact eps network of Gaussian data through the denoiser contract (fixed variance)."""
    return DiscreteVPDenoiser(gaussian_eps_network(d, mu, s), d)


def exact_variance_denoiser(d: GaussianDiffusion, mu: float, s: float) -> DiscreteVPDenoiser:
    """The exact denoiser plus the exact reverse variance, encoded as iDDPM eq. 15's v:
    log var = frac log beta_t + (1 - frac) log beta~_t (beta~_0 clipped to beta~_1), v = 2 frac - 1."""
    var, beta_tilde, beta = optimal_reverse_variance(abar_of(d), s)
    lo = torch.log(torch.cat([beta_tilde[1:2], beta_tilde[1:]]))
    v_all = 2 * (var.log() - lo) / (beta.log() - lo) - 1
    eps_net = gaussian_eps_network(d, mu, s)

    def net(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:  # 2C outputs: eps, then v
        v = v_all[t].reshape(-1, *([1] * (z.ndim - 1))).to(z.dtype).expand_as(z)
        return torch.cat([eps_net(z, t, y), v], dim=1)

    return DiscreteVPDenoiser(net, d, learned_variance=True)


@pytest.mark.parametrize("t", [1, 5, 50, 400, 999])
def test_expected_kl_term_for_gaussian_data(t):
    """Continuous x0 ~ N(mu, s^2), exact denoiser: E[L_t] = (r - 1) / 2 nats for sigma^2 = beta~_t and
    log(r) / 2 for the exact reverse variance, where r = Var[x_{t-1} | x_t] / beta~_t."""
    mu, s, n = 0.2, 0.5, 100_000
    d = linear_process()
    g = torch.Generator().manual_seed(t)
    x0 = mu + s * torch.randn(n, 1, generator=g, dtype=torch.float64)
    tt = torch.full((n,), t, dtype=torch.long)
    x_t = d.q_sample(x0, tt, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    var, beta_tilde, _ = optimal_reverse_variance(abar_of(d), s)
    r = (var[t] / beta_tilde[t]).item()
    fixed = vlb_terms(d, predict(exact_denoiser(d, mu, s), d, x_t, tt), x0, x_t, tt, "fixed_small")
    exact = vlb_terms(d, predict(exact_variance_denoiser(d, mu, s), d, x_t, tt), x0, x_t, tt, "learned_range")
    # Per sample L_t = a chi^2_1 / 2 (+ const): relative standard error sqrt(2 / n) ~ 0.45% (the bound: 3.3 SE).
    assert fixed.mean().item() == pytest.approx(0.5 * (r - 1) / LOG2, rel=0.015)
    assert exact.mean().item() == pytest.approx(0.5 * math.log(r) / LOG2, rel=0.015)


def test_prior_bpd_closed_form():
    d = linear_process()
    x0 = torch.linspace(-1, 1, 2 * 3 * 8 * 8, dtype=torch.float64).reshape(2, 3, 8, 8)
    abar = abar_of(d)[-1].item()
    # KL(N(sqrt(abar) x, 1 - abar) || N(0, 1)) = (-log(1 - abar) + (1 - abar) + abar x^2 - 1) / 2.
    kl = 0.5 * (-math.log1p(-abar) - abar + abar * x0**2)
    torch.testing.assert_close(prior_bpd(d, x0), kl.mean(dim=(1, 2, 3)) / LOG2, rtol=1e-9, atol=1e-15)
    assert prior_bpd(d, x0).max().item() < 1e-4  # as reported for the linear T=1000 schedule


# ----------------------------------------------------------------------------- training losses
def _loss_inputs(seed: int = 0, C: int = 3):
    d = linear_process()
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(8, C, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([0, 1, 2, 10, 100, 500, 900, 999])
    noise = torch.randn(x0.shape, generator=g)
    x_t = d.q_sample(x0, t, noise)
    out = (0.3 * torch.randn(8, 2 * C, 4, 4, generator=g)).requires_grad_(True)
    return d, x0, x_t, t, noise, out


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_hybrid_loss_stops_the_vlb_gradient_on_the_mean(prediction_type):
    d, x0, x_t, t, noise, out = _loss_inputs()
    C = x0.shape[1]
    terms = hybrid_loss(d, out, x0, x_t, t, noise, prediction_type=prediction_type, loss_type="hybrid")
    (g_vlb,) = torch.autograd.grad(terms["vlb"].sum(), out, retain_graph=True)
    assert (g_vlb[:, :C] == 0).all() and g_vlb[:, C:].abs().sum() > 0
    (g_total,) = torch.autograd.grad(terms["loss"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    torch.testing.assert_close(g_total[:, :C], g_mse[:, :C], rtol=0, atol=0)
    # Pure vlb trains the mean too.
    vlb = hybrid_loss(d, out, x0, x_t, t, noise, prediction_type=prediction_type, loss_type="vlb")
    (g,) = torch.autograd.grad(vlb["loss"].sum(), out)
    assert g[:, :C].abs().sum() > 0 and g[:, C:].abs().sum() > 0


@pytest.mark.parametrize("t,x0_error", [(1, 0.01), (3, 0.02), (20, 0.05)])
def test_vlb_term_trains_the_variance_towards_the_kl_optimum(t, x0_error):
    """For t > 0, L_t as a function of the learned v is minimised where the reverse variance equals
    beta~_t + coef1_t^2 mean((x0_hat - x_0)^2): the posterior variance plus the mean's squared error
    (per-dim Gaussian KL, DDPM eq. 7). So L_vlb drives frac = (v + 1) / 2 to
    (log(that) - log beta~) / (log beta - log beta~), which experiments/improved_ddpm/x0_error_by_t.py reports as
    opt_frac."""
    d = linear_process()
    g = torch.Generator().manual_seed(t)
    x0 = torch.rand(4, 1, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    tt = torch.full((4,), t)
    x_t = d.q_sample(x0, tt, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    x0_hat = x0 + x0_error * torch.randn(x0.shape, generator=g, dtype=torch.float64)  # an imperfect mean
    abar = abar_of(d).double()
    A, A_prev = abar[t].item(), abar[t - 1].item()
    beta, beta_tilde = 1 - A / A_prev, (1 - A / A_prev) * (1 - A_prev) / (1 - A)
    coef1 = beta * math.sqrt(A_prev) / (1 - A)
    optimum = beta_tilde + coef1**2 * ((x0_hat - x0) ** 2).mean().item()
    frac_star = (math.log(optimum) - math.log(beta_tilde)) / (math.log(beta) - math.log(beta_tilde))
    assert 0.05 < frac_star < 0.95  # an interior optimum: the check below can fail either way

    def loss(frac: float) -> float:
        v = torch.full_like(x0, 2 * frac - 1)
        pred = ModelPrediction(x0_hat, d.predict_eps_from_x0(x_t, tt, x0_hat), v)
        return vlb_terms(d, pred, x0, x_t, tt, "learned_range").mean().item()

    fracs = np.linspace(0, 1, 2001)
    best = fracs[np.argmin([loss(f) for f in fracs])]
    assert best == pytest.approx(frac_star, abs=1e-3)
    assert loss(frac_star) < min(loss(frac_star - 0.05), loss(frac_star + 0.05))


def test_loss_scales_match_the_reference():
    d, x0, x_t, t, noise, out = _loss_inputs(1)
    T = d.num_timesteps
    pred = d.prediction_from_output(out.detach(), x_t, t, "eps")
    vb = vlb_terms(d, pred, x0, x_t, t, "learned_range")
    mse = ((noise - out.detach()[:, :3]) ** 2).mean(dim=(1, 2, 3))
    hybrid = hybrid_loss(d, out, x0, x_t, t, noise)
    torch.testing.assert_close(hybrid["vlb"], vb)
    torch.testing.assert_close(hybrid["mse"], mse)
    torch.testing.assert_close(hybrid["loss"], mse + vb * T / 1000)  # reference: mse + vb * T / 1000
    torch.testing.assert_close(hybrid_loss(d, out, x0, x_t, t, noise, loss_type="vlb")["loss"], vb * T)
    simple = hybrid_loss(d, out, x0, x_t, t, noise, loss_type="simple")
    torch.testing.assert_close(simple["loss"], mse)
    assert not simple["vlb"].requires_grad
    # A C-channel output: fixed_small variance, the hybrid adds a constant.
    eps_out = out.detach()[:, :3].clone().requires_grad_(True)
    fixed = hybrid_loss(d, eps_out, x0, x_t, t, noise, variance_type="fixed_small")
    (g,) = torch.autograd.grad(fixed["loss"].sum(), eps_out, retain_graph=True)
    torch.testing.assert_close(g, torch.autograd.grad(fixed["mse"].sum(), eps_out)[0])
    with pytest.raises(ValueError, match="loss_type"):
        hybrid_loss(d, out, x0, x_t, t, noise, loss_type="kl")
    with pytest.raises(ValueError, match="needs 3 output channels"):  # the variance is decided by the model
        hybrid_loss(d, out, x0, x_t, t, noise, variance_type="fixed_small")


# ----------------------------------------------------------------------------- the full bound
def discretised_gaussian_pmf(mu: float, s: float) -> torch.Tensor:
    """P(bin k) for x ~ N(mu, s^2) rounded to the nearest of the 256 levels (edge bins take the tails)."""
    edges = (CENTRES[:-1] + 1 / 255).numpy()
    cdf = np.concatenate([[0.0], stats.norm.cdf(edges, mu, s), [1.0]])
    return torch.from_numpy(np.diff(cdf))


def test_bound_on_discretised_gaussian_data_is_above_and_close_to_the_nll():
    """x0 ~ N(0, 0.4^2) discretised to 256 levels; H = -sum p_k log2 p_k is its exact NLL.

    The model is the exact denoiser of the *continuous* Gaussian on the linear T=1000 process, so
    total_bpd is a valid upper bound on the NLL of a model that is not quite the data distribution.
    Observed (4096 samples x 16 pixels, seed 0): H = 7.6495 bits/dim; with the exact reverse variance
    total_bpd = 7.6859 +- 0.0065 (gap ~0.036 = 5.6 SE: the edge bins hold 1.2% of the mass, which the
    smooth model reaches only through its tails; with s = 0.5, 4.6% edge mass, the gap grows to ~0.16);
    with fixed_small 8.4562 +- 0.010 (gap ~0.8, from sigma^2 = beta~_t being far too small at small t,
    iDDPM Sec. 3.1 / Fig. 2). Excess of fixed_small at t >= 1: 0.6506 measured, 0.6525 closed form.
    Tolerance: the bound must not fall 4 SE below H, and the exact model must be within 0.1 bits of H. The test
    draws 1024 samples (about twice the SE above; 4096 took 70 s of the suite's time on a 2-core CPU).
    """
    mu, s, B, D = 0.0, 0.4, 1024, 16
    d = linear_process()
    pmf = discretised_gaussian_pmf(mu, s)
    H = -(pmf * pmf.log2()).sum().item()

    def bound(denoiser, variance_type):
        g = torch.Generator().manual_seed(0)
        x0 = CENTRES[torch.multinomial(pmf, B * D, replacement=True, generator=g)].reshape(B, D)
        return calc_bpd_loop(denoiser, d, x0, variance_type, generator=g)

    exact = bound(exact_variance_denoiser(d, mu, s), "learned_range")
    fixed = bound(exact_denoiser(d, mu, s), "fixed_small")  # same x0 and the same x_t draws
    nll, se = exact["total_bpd"].mean().item(), exact["total_bpd"].std().item() / math.sqrt(B)
    msg = f"H = {H:.4f} bits/dim, bound = {nll:.4f} +- {se:.4f}, fixed_small {fixed['total_bpd'].mean():.4f}"
    assert nll > H - 4 * se, msg  # a bound
    assert nll < H + 0.1, msg  # and a tight one for the exact model
    assert fixed["total_bpd"].mean().item() > nll, msg

    # Same x_t: the fixed_small excess at t >= 1 is E[(r - 1 - log r) / 2] exactly (r = var / beta~_t),
    # the decoder difference aside; bins are far below the noise scale there, so data are "continuous".
    var, beta_tilde, _ = optimal_reverse_variance(abar_of(d), s)
    r = var[1:] / beta_tilde[1:]
    expected = (0.5 * (r - 1 - r.log()) / LOG2).sum().item()
    excess = (fixed["vb"][:, 1:] - exact["vb"][:, 1:]).sum(dim=1).mean().item()
    assert excess == pytest.approx(expected, rel=0.02), (excess, expected)
    assert exact["prior_bpd"].max().item() < 1e-4
    assert exact["vb"].shape == (B, 1000) and exact["mse"].shape == (B, 1000)


def test_calc_bpd_loop_on_a_respaced_process_calls_model_timesteps():
    base = linear_process()
    d = base.respace(range(0, 1000, 100))
    seen: list[int] = []

    def net(z, t, y):  # predicts x0 = 0
        seen.append(int(t[0]))
        return torch.zeros_like(z)

    x0 = torch.zeros(2, 3, 2, 2)
    out = calc_bpd_loop(DiscreteVPDenoiser(net, base, "x0"), d, x0, "fixed_small", clip_denoised=True)
    assert seen == list(range(900, -1, -100))
    assert out["total_bpd"].shape == (2,) and out["vb"].shape == (2, 10)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    torch.testing.assert_close(out["xstart_mse"], torch.zeros(2, 10))
    # x0 = 0 predicted exactly: only the decoder term and the prior are non-zero.
    assert out["vb"][:, 1:].abs().max() < 1e-5 and out["vb"][:, 0].min() > 0


def test_calc_bpd_loop_matches_vlb_terms_step_by_step():
    d = linear_process(50)
    x0 = torch.rand(4, 2, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def net(z, t, y):  # x0_hat = z / 2 and v = tanh(z), as 2C channels of an x0-prediction network
        return torch.cat([0.5 * z, torch.tanh(z)], dim=1)

    denoiser = DiscreteVPDenoiser(net, d, "x0", learned_variance=True)
    out = calc_bpd_loop(denoiser, d, x0, "learned_range", generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)  # replay the same noise draws
    for i in range(49, -1, -1):
        t = torch.full((4,), i)
        noise = torch.randn(x0.shape, generator=g)
        x_t = d.q_sample(x0, t, noise)
        x0_hat = 0.5 * x_t  # what the network said, written out
        pred = ModelPrediction(x0_hat, d.predict_eps_from_x0(x_t, t, x0_hat), torch.tanh(x_t))
        torch.testing.assert_close(out["vb"][:, i], vlb_terms(d, pred, x0, x_t, t, "learned_range"))
        torch.testing.assert_close(out["mse"][:, i], ((pred.eps - noise) ** 2).mean(dim=(1, 2)))
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + prior_bpd(d, x0))


# ----------------------------------------------------------------------------- importance sampling
def test_uniform_sampler():
    sampler = UniformSampler(7)
    t, w = sampler.sample(1000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < 7 and (w == 1).all()


def test_second_moment_resampler(tmp_path):
    T, u = 5, 0.001
    sampler = LossSecondMomentResampler(T)
    torch.testing.assert_close(sampler.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    scale = torch.tensor([1.0, 2.0, 0.5, 4.0, 3.0], dtype=torch.float64)
    pattern = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0, 2.0, 1.5, -0.5, 1.0, 2.5], dtype=torch.float64)
    # Warm-up: uniform until every term has 10 values (here term T-1 has only 9).
    for j in range(10):
        ts = torch.arange(T - 1) if j == 9 else torch.arange(T)
        sampler.update(ts, torch.full((len(ts),), 1e6))
        assert (sampler.probabilities() == 1 / T).all()
    # Ten more values per term (as float32 tensors, in one call each): the history keeps only the
    # last 10 values of each term, so the 1e6 outliers drop out.
    for j in range(10):
        sampler.update(torch.arange(T).float(), (scale * pattern[j]).float())
    # sqrt(E[L_t^2]) = scale_t * rms(pattern): p = scale / sum(scale), mixed with uniform (iDDPM eq. 18).
    expected = scale / scale.sum() * (1 - u) + u / T
    p = sampler.probabilities()
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=0)

    g = torch.Generator().manual_seed(0)
    t, w = sampler.sample(200_000, "cpu", g)
    torch.testing.assert_close(w, (1 / (T * expected[t])).float())
    freq = torch.bincount(t, minlength=T).double() / len(t)
    assert (freq - expected).abs().max() < 5 * math.sqrt(0.25 / len(t))
    assert w.mean().item() == pytest.approx(1.0, abs=0.01)  # E[1 / (T p_t)] = 1: unbiased reweighting

    buf = io.BytesIO()
    torch.save(sampler.state_dict(), buf)
    buf.seek(0)
    restored = LossSecondMomentResampler(T)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(restored.probabilities(), p)
    a = sampler.sample(16, "cpu", torch.Generator().manual_seed(3))
    b = restored.sample(16, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError):
        LossSecondMomentResampler(T + 1).load_state_dict(sampler.state_dict())


def test_stratified_bound_is_an_unbiased_estimate_of_the_full_bound():
    """calc_bpd_stratified (K + 1 network calls per image) has the full loop's mean (T calls)."""
    mu, s, B, D = 0.0, 0.4, 2048, 16
    d = linear_process(200)
    pmf = discretised_gaussian_pmf(mu, s)
    g = torch.Generator().manual_seed(1)
    x0 = CENTRES[torch.multinomial(pmf, B * D, replacement=True, generator=g)].reshape(B, D)
    denoiser = exact_variance_denoiser(d, mu, s)
    full = calc_bpd_loop(denoiser, d, x0, "learned_range", generator=g)["total_bpd"]
    est = calc_bpd_stratified(denoiser, d, x0, "learned_range", num_strata=10, generator=g)["total_bpd"]
    se = math.sqrt(full.var().item() / B + est.var().item() / B)
    assert est.mean().item() == pytest.approx(full.mean().item(), abs=4 * se), (est.mean(), full.mean(), se)
    assert est.std() > full.std()  # the price of 11 instead of 200 calls: more variance per image
