"""Progressive distillation (Salimans & Ho 2022, Alg. 2) as tensor math over the denoiser contract.

In the coordinates x = z / alpha of :mod:`.denoisers` a deterministic DDIM step sigma -> sigma' at the prediction x0_hat
is x' = x0_hat + (sigma' / sigma) (x - x0_hat) (eq. 8 of the paper with z = alpha x). A student on an N-step grid
t_i = i / N of the teacher's continuous time (``time.sigma(t)``) is trained so that one of its DDIM steps t -> t - 1/N
lands where two teacher steps t -> t - 1/(2N) -> t - 1/N land: with r = sigma'' / sigma, the student's x0_hat must be

    x~ = (x'' - r x) / (1 - r),

which is the paper's x~ = (z'' - (sigma''/sigma) z_t) / (alpha'' - (sigma''/sigma) alpha_t) written in x (the VP
sigma ratio sigma''_vp / sigma_vp is r alpha'' / alpha). On the last step (sigma'' = 0) x~ is the teacher's x0_hat at
the midpoint, as in the reference code.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .conditioning import Cond
from .denoisers import Denoiser, append_dims
from .losses import Weighting, loss_weight, mean_flat


class Time(Protocol):
    """A continuous time over a VP model's noise levels (:class:`~.schedules.CosineSchedule`,
    :class:`~.schedules.DiscreteTime`)."""

    def sigma(self, t: Tensor) -> Tensor: ...


def ddim_step(denoiser: Denoiser, x: Tensor, sigma: Tensor, sigma_next: Tensor, y: Cond = None) -> Tensor:
    """One deterministic DDIM step per sample from ``sigma`` to ``sigma_next`` ((B,) each; 0 gives x0_hat)."""
    x0 = denoiser(x, sigma, y)
    return x0 + append_dims(sigma_next / sigma, x.ndim) * (x - x0)


def step_levels(time: Time, i: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """sigma at t = i / n, at the midpoint t - 1 / (2n) and at t'' = t - 1 / n for integer ``i`` in 1..n (sigma'' = 0
    at t'' = 0), in float64 on ``i``'s device."""
    t = i.to(torch.float64) / n
    sigma, sigma_mid = time.sigma(t), time.sigma(t - 0.5 / n)
    sigma_next = torch.where(i > 1, time.sigma((t - 1.0 / n).clamp(min=0.0)), torch.zeros_like(t))
    return sigma, sigma_mid, sigma_next


@torch.no_grad()
def distillation_target(
    teacher: Denoiser, x: Tensor, sigma: Tensor, sigma_mid: Tensor, sigma_next: Tensor, y: Cond = None
) -> Tensor:
    """x~ (module docstring): the x0_hat with which one student DDIM step sigma -> sigma_next reproduces two teacher
    DDIM steps sigma -> sigma_mid -> sigma_next. The teacher's predictions are not clipped (the reference code)."""
    x_next = ddim_step(teacher, ddim_step(teacher, x, sigma, sigma_mid, y), sigma_mid, sigma_next, y)
    r = append_dims(sigma_next / sigma, x.ndim)
    return (x_next - r * x) / (1 - r)


def distillation_loss(
    student: Denoiser,
    teacher: Denoiser,
    x0: Tensor,
    time: Time,
    n: int,
    y: Cond = None,
    weighting: Weighting = "truncated_snr",
) -> Tensor:
    """Per-sample loss of Alg. 2 for a student on the ``n``-step grid: i ~ U{1..n}, x = x0 + sigma eps, target x~ of
    two teacher steps, w(sigma) ||D_student(x, sigma) - x~||^2 (mean over elements)."""
    i = torch.randint(1, n + 1, (x0.shape[0],), device=x0.device)
    sigma, sigma_mid, sigma_next = step_levels(time, i, n)
    x = x0 + append_dims(sigma.to(x0.dtype), x0.ndim) * torch.randn_like(x0)
    s, s_mid, s_next = (v.to(x0.dtype) for v in (sigma, sigma_mid, sigma_next))
    target = distillation_target(teacher, x, s, s_mid, s_next, y)
    x0_hat = student(x, s, y)
    return loss_weight(sigma, weighting).float() * mean_flat((x0_hat.float() - target.float()) ** 2)
