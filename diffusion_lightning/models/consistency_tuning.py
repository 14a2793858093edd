"""Easy consistency tuning, ECT (Geng et al. 2024, "Consistency Models Made Easy"): a trained diffusion model tuned
into a consistency model in continuous time, the gap between the two levels shrinking stage by stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from diffusion_lightning.diffusion.conditioning import Cond
from diffusion_lightning.diffusion.consistency import ConsistencyFunction, consistency_loss, ect_r
from diffusion_lightning.diffusion.denoisers import append_dims
from diffusion_lightning.errors import UserError

from .base import DiffusionModel
from .student import StudentModel


class ConsistencyTuning(StudentModel):
    """A consistency model initialised from a trained diffusion model of the framework (the teacher's EMA network, on
    its own parameterisation with the boundary condition imposed:
    :class:`~diffusion_lightning.diffusion.consistency.ConsistencyFunction`), trained without the teacher.

    Step k: t ~ lognormal(P_mean, P_std) within [sigma_min, sigma_max], r = t (1 - q^-(s+1) (1 + k' sigmoid(-b t)))
    with s = floor(k / steps_per_stage) (:func:`~diffusion_lightning.diffusion.consistency.ect_r`), one noise z for
    x_t = x0 + t z and x_r = x0 + r z, and the loss ||f(x_t, t) - sg f(x_r, r)|| / (t - r) (pseudo-Huber with c,
    0: the L2 norm; the target is x0 where r < sigma_min), both calls with the same dropout mask.

    Args:
        teacher, dropout: see :class:`~.student.StudentModel` (ECT on CIFAR-10: dropout 0.2).
        steps_per_stage: optimizer steps per halving of the gap (the reference on CIFAR-10: 25k of 200k).
        q, k, b: the mapping's decay factor and its sigmoid's scale and slope (2, 8, 1).
        p_mean, p_std: the lognormal of t (-1.1, 2.0).
        huber_c: pseudo-Huber's c (0: the L2 norm, the reference's CIFAR-10 setting).
        sigma_min, sigma_max, mid_sigmas: the consistency model's range and multistep sampling levels.
        **kwargs: the :class:`~.base.DiffusionModel` arguments (sampler, optimiser, speed options).
    """

    def __init__(
        self,
        teacher: DiffusionModel | None = None,
        steps_per_stage: int = 25000,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        huber_c: float = 0.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        mid_sigmas: Sequence[float] = (0.821,),
        dropout: float | None = None,
        **kwargs: Any,
    ) -> None:
        if q <= 1 or steps_per_stage < 1:
            raise UserError(f"need q > 1 and steps_per_stage >= 1, got {q} and {steps_per_stage}")
        kwargs = {"sampler": {"name": "consistency", "steps": 1}, **kwargs}
        super().__init__(teacher, dropout, recipe=("consistency tuning", "ect"), **kwargs)
        self.save_hyperparameters(ignore=["teacher", "optimizer", "lr_scheduler"])
        self.steps_per_stage, self.q, self.k, self.b = int(steps_per_stage), q, k, b
        self.p_mean, self.p_std, self.huber_c = p_mean, p_std, huber_c
        self.sigma_min, self.sigma_max, self.mid_sigmas = sigma_min, sigma_max, tuple(mid_sigmas)

    def denoiser(self) -> ConsistencyFunction:
        inner = self.vp_denoiser(self.net, self.teacher_prediction_type)
        return ConsistencyFunction(inner, self.sigma_min, self.sigma_max, self.mid_sigmas)

    def stage(self, step: int) -> int:
        """The stage of optimizer step ``step``: the gap t - r halves (q = 2) from one to the next."""
        return step // self.steps_per_stage

    def loss(self, x0: Tensor, cond: Cond) -> Tensor:
        """Per-sample ||f(x_t, t) - sg f(x_r, r)|| / (t - r) (pseudo-Huber with ``huber_c``)."""
        t = (torch.randn(x0.shape[0], device=x0.device) * self.p_std + self.p_mean).exp()
        t = t.clamp(self.sigma_min, self.sigma_max)
        r = ect_r(t, self.stage(self.global_step), self.q, self.k, self.b)
        z = torch.randn_like(x0)
        x_t, x_r = x0 + append_dims(t, x0.ndim) * z, x0 + append_dims(r, x0.ndim) * z
        f = self.denoiser()  # the target is the same f under stop-gradient (x0 where r < sigma_min)
        d = consistency_loss(f, f, x_t, t, x_r, r, x0, cond, "pseudo_huber", self.huber_c)
        return d.float() / (t - r).float()

    def step_values(self) -> dict[str, float]:
        return {"train/ect_stage": float(self.stage(self.global_step))}
