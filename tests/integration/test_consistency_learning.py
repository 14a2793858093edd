"""Consistency training and distillation learn the exact consistency function of Gaussian data (a small network, a
few thousand Adam steps): the training layer's end-to-end check of the consistency losses."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import GaussianDenoiser
from test_consistency_math import SIGMA_MAX, SIGMA_MIN
from torch import nn

from diffusion_lightning.diffusion import EDMPrecond
from diffusion_lightning.diffusion.consistency import (
    consistency_loss,
    karras_levels,
    lognormal_level_probs,
    ode_step,
)

MU, S, DIM = 0.3, 0.5, 2


def _f_star(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact consistency function of N(MU, S^2 I): MU + (x - MU) sqrt((S^2 + sigma_min^2) / (S^2 + sigma^2))."""
    return MU + (x - MU) * ((S**2 + SIGMA_MIN**2) / (S**2 + sigma**2)).sqrt().reshape(-1, 1)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIM + 1, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                  nn.Linear(128, DIM))  # fmt: skip

    def forward(self, x, c_noise, y=None):
        return self.body(torch.cat([x, c_noise.reshape(-1, 1) / 250.0], dim=1))


def _train(method: str, steps: int = 3000, n_levels: int = 40) -> EDMPrecond:
    """A consistency function over a small MLP trained by CT (the data only) or CD (one Heun step of the exact
    denoiser's ODE), with iCT's pseudo-Huber distance, weights 1 / (sigma_{i+1} - sigma_i) and lognormal levels."""
    torch.manual_seed(0)
    net = _MLP()
    f = EDMPrecond(net, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, boundary_condition=True)
    teacher = GaussianDenoiser(MU, S)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    sigmas = karras_levels(n_levels).float()
    p = lognormal_level_probs(karras_levels(n_levels))
    for _ in range(steps):
        x0 = MU + S * torch.randn(512, DIM)
        i = torch.multinomial(p, 512, replacement=True)
        lo, hi = sigmas[i], sigmas[i + 1]
        z = torch.randn_like(x0)
        x_hi = x0 + hi[:, None] * z
        x_lo = x0 + lo[:, None] * z if method == "ct" else ode_step(teacher, x_hi, hi, lo, solver="heun")
        loss = (consistency_loss(f, f, x_hi, hi, x_lo, lo, x0) / (hi - lo)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return f


@pytest.mark.parametrize("method", ["cd", "ct"])
def test_ct_and_cd_learn_the_exact_consistency_function_of_gaussian_data(method):
    f = _train(method)
    torch.manual_seed(1)
    errors = []
    with torch.no_grad():
        for sigma in karras_levels(10).float().tolist():
            x = MU + math.sqrt(S**2 + sigma**2) * torch.randn(4000, DIM)  # the marginal at sigma
            s = torch.full((4000,), sigma)
            errors.append(float((f(x, s) - _f_star(x, s)).square().mean().sqrt()))
        # one-step generation from the prior N(0, sigma_max^2)
        samples = f(SIGMA_MAX * torch.randn(20000, DIM), torch.full((20000,), SIGMA_MAX))
    # RMS error against f* at 10 levels in [0.002, 80], relative to the data's std S (measured at seed 0): at most
    # 0.055 (CD) and 0.074 (CT), largest at sigma_max; the untrained network: 1.15. One-step samples: mean 0.310 /
    # 0.301, std 0.491 / 0.465 (CT's finite-N targets shrink it a little)
    assert max(errors) < (0.08 if method == "cd" else 0.1) * S, errors
    assert float(samples.mean()) == pytest.approx(MU, abs=0.05)
    assert float(samples.std()) == pytest.approx(S, rel=0.1)
