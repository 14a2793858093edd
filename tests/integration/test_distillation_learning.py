"""A small student distilled round after round from the exact teacher of Gaussian data reproduces its teacher's
two-step map (Salimans & Ho 2022, Alg. 2): the end-to-end check of the progressive-distillation target."""

from __future__ import annotations

import math

import pytest
import torch
from test_distillation_targets import MU, D, S, exact_teacher
from torch import nn

from diffusion_lightning.diffusion import (
    ContinuousVPDenoiser,
    CosineSchedule,
    sample,
    uniform_t_sigmas,
)
from diffusion_lightning.diffusion.distillation import (
    distillation_loss,
)


class MLPStudent(nn.Module):
    """A small student for d-dimensional data: an MLP of z and Fourier features of its time input."""

    def __init__(self, d: int, hidden: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d + 8, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, d))  # fmt: skip

    def forward(self, z, c, y=None):
        t = (c / 1000.0).to(z.dtype)[:, None]
        feats = [torch.cos(math.pi * k * t) for k in range(4)] + [torch.sin(math.pi * k * t) for k in range(1, 5)]
        return self.mlp(torch.cat([z, *feats], 1))


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_small_student_reproduces_its_teachers_two_step_map_round_after_round(prediction_type):
    """Rounds 8 -> 4 -> 2 -> 1 steps from the exact teacher: each student, trained 400 steps with Alg. 2 (Adam, lr
    decayed linearly to 0 within the round, truncated-SNR weights) and then the next round's teacher, maps fresh noise
    through N DDIM steps to within 0.03 (RMS; the data's std is 0.7) of where its teacher's 2N steps map it, where
    the teacher's own N steps land more than 0.09 away."""
    torch.manual_seed(0)
    schedule = CosineSchedule()
    teacher, _ = exact_teacher("continuous")
    net = MLPStudent(D)
    noise = torch.randn(512, D, generator=torch.Generator().manual_seed(1))
    prior = math.sqrt(1 + float(schedule.sigma(1.0)) ** 2)

    def run(denoiser, n):  # DDIM on the n-step grid uniform in t (the exact teacher's own grid would be Karras')
        return sample(denoiser, noise, "ddim", grid=uniform_t_sigmas(schedule, n).tolist(), clip_denoised=False).x

    errors, undistilled = [], []
    for n in (4, 2, 1):
        student = ContinuousVPDenoiser(net, schedule, prediction_type)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / 400)
        for _ in range(400):
            x0 = MU + S * torch.randn(256, D)
            loss = distillation_loss(student, teacher, x0, schedule, n).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            rms = (run(student, n) - run(teacher, 2 * n)).square().mean().sqrt().item()
            undistilled.append((run(teacher, n) - run(teacher, 2 * n)).square().mean().sqrt().item())
        errors.append(rms)
        frozen = MLPStudent(D)
        frozen.load_state_dict(net.state_dict())
        teacher = ContinuousVPDenoiser(frozen.requires_grad_(False), schedule, prediction_type)
    print(f"RMS student (n steps) vs teacher (2n steps), n = 4, 2, 1: {errors}; teacher n vs 2n steps: {undistilled}")
    assert prior > 1e4 and all(e < 0.03 for e in errors), errors
    assert all(u > 0.09 for u in undistilled), undistilled  # what halving the steps costs without distillation
