"""Progressive distillation math (Salimans & Ho 2022, Alg. 2) on teachers that are exact for Gaussian data."""

from __future__ import annotations

import pytest
import torch
from oracles import GaussianDenoiser, gaussian_eps_network

from diffusion_lightning.diffusion import (
    ContinuousVPDenoiser,
    CosineSchedule,
    DiscreteVPDenoiser,
    GaussianDiffusion,
)
from diffusion_lightning.diffusion.distillation import (
    ddim_step,
    distillation_target,
    step_levels,
)
from diffusion_lightning.diffusion.losses import loss_weight
from diffusion_lightning.diffusion.schedules import DiscreteTime, cosine_beta_schedule

MU, S, D = 0.3, 0.7, 6


def exact_teacher(kind: str):
    """A teacher whose x0_hat is the Bayes-optimal one of N(MU, S^2): continuous (cosine time, the exact denoiser) or
    discrete (the exact eps network of a 1000-step cosine DDPM), with its continuous time."""
    if kind == "continuous":
        schedule = CosineSchedule()
        den = GaussianDenoiser(MU, S, float(schedule.sigma(0.0)), float(schedule.sigma(1.0)))
        return den, schedule
    diffusion = GaussianDiffusion(cosine_beta_schedule(1000))
    den = DiscreteVPDenoiser(gaussian_eps_network(diffusion, MU, S), diffusion, "eps")
    return den, den.time


def target_as_student_output(x, target, sigma, prediction_type):
    """The network output of an x0- or v-parameterised VP student whose x0_hat is ``target``."""
    s = sigma[:, None]
    alpha = (1 + s**2).rsqrt()
    if prediction_type == "x0":
        return target
    eps = (x - target) / s
    return alpha * eps - s * alpha * target  # v = alpha eps - sigma_vp x0


@pytest.mark.parametrize("kind", ["continuous", "discrete"])
@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_one_student_step_on_the_target_is_two_teacher_steps(kind, prediction_type):
    """Alg. 2: with x0_hat = x~, one student DDIM step t -> t - 1/N lands exactly where two teacher DDIM steps land,
    for x- and v-students, at several t including the last step (i = 1: the teacher's x0_hat); and x~ equals the
    paper's z-space formula."""
    teacher, time = exact_teacher(kind)
    n = 8
    g = torch.Generator().manual_seed(0)
    i = torch.tensor([8, 7, 5, 3, 2, 1, 1, 4])
    sigma, sigma_mid, sigma_next = step_levels(time, i, n)
    x = MU + torch.randn(len(i), D, generator=g, dtype=torch.float64) * (S**2 + sigma[:, None] ** 2).sqrt()
    target = distillation_target(teacher, x, sigma, sigma_mid, sigma_next)
    two_teacher_steps = ddim_step(teacher, ddim_step(teacher, x, sigma, sigma_mid), sigma_mid, sigma_next)

    out = target_as_student_output(x, target, sigma, prediction_type)
    student = ContinuousVPDenoiser(lambda z, c, y: out, CosineSchedule(), prediction_type)
    one_student_step = ddim_step(student, x, sigma, sigma_next)
    torch.testing.assert_close(one_student_step, two_teacher_steps, rtol=1e-12, atol=1e-12)
    last = i == 1
    assert bool(last.any()) and bool((sigma_next[last] == 0).all())
    torch.testing.assert_close(target[last], teacher(ddim_step(teacher, x, sigma, sigma_mid)[last], sigma_mid[last]))

    # the paper's form: x~ = (z'' - (s''/s) z) / (a'' - (s''/s) a) in VP coordinates z = alpha x, s = sigma_vp
    alpha, alpha_next = (1 + sigma**2).rsqrt()[:, None], (1 + sigma_next**2).rsqrt()[:, None]
    svp, svp_next = sigma[:, None] * alpha, sigma_next[:, None] * alpha_next
    z, z_next = alpha * x, alpha_next * two_teacher_steps
    paper = (z_next - svp_next / svp * z) / (alpha_next - svp_next / svp * alpha)
    torch.testing.assert_close(target, paper, rtol=1e-10, atol=1e-10)


def test_step_levels_and_weights():
    time = CosineSchedule()
    i = torch.tensor([1, 2, 4])
    sigma, mid, nxt = step_levels(time, i, 4)
    torch.testing.assert_close(sigma, time.sigma(torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)))
    torch.testing.assert_close(mid, time.sigma(torch.tensor([0.125, 0.375, 0.875], dtype=torch.float64)))
    torch.testing.assert_close(nxt, torch.stack([torch.tensor(0.0, dtype=torch.float64), time.sigma(0.25),
                                                 time.sigma(0.75)]))  # fmt: skip
    s = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(loss_weight(s), torch.tensor([100.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(loss_weight(s, "snr+1"), torch.tensor([101.0, 2.0, 1.01], dtype=torch.float64))
    torch.testing.assert_close(loss_weight(s, "snr"), torch.tensor([100.0, 1.0, 0.01], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown weighting"):
        loss_weight(s, "snr_trunc")


def test_discrete_time_sits_on_the_levels():
    diffusion = GaussianDiffusion(cosine_beta_schedule(100))
    time = DiscreteTime(diffusion.sigmas)
    k = torch.tensor([0, 17, 99])
    t = (k + 1).double() / 100
    torch.testing.assert_close(time.sigma(t), diffusion.sigmas[k])
    torch.testing.assert_close(time.timestep(diffusion.sigmas[k]), k.double())
    torch.testing.assert_close(time.t(time.sigma(torch.tensor([0.333, 0.5, 0.9], dtype=torch.float64))),
                               torch.tensor([0.333, 0.5, 0.9], dtype=torch.float64))  # fmt: skip
    mid = time.sigma(torch.tensor(0.175, dtype=torch.float64))  # halfway between levels 16 and 17 in log sigma
    assert float(mid.log()) == pytest.approx(float(diffusion.sigmas[16:18].log().mean()), rel=1e-12)
