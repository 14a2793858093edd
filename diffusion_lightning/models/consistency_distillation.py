"""Consistency distillation (Song et al. 2023, Alg. 2): a consistency model from a frozen diffusion teacher."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lightning.diffusion.conditioning import Cond
from diffusion_lightning.diffusion.consistency import (
    ConsistencyFunction,
    Distance,
    Solver,
    consistency_loss,
    ema_update,
    karras_levels,
    ode_step,
)
from diffusion_lightning.diffusion.denoisers import append_dims
from diffusion_lightning.errors import UserError

from .base import DiffusionModel
from .consistency_training import DistanceChoice
from .student import StudentModel


class ConsistencyDistillation(StudentModel):
    """A consistency model f(x, sigma) = x + (sigma - sigma_min) / sigma (D(x, sigma) - x) over a copy of the teacher's
    network (:class:`~diffusion_lightning.diffusion.consistency.ConsistencyFunction`: f starts as the teacher's
    denoiser and meets the boundary condition exactly), trained on the teacher's probability-flow ODE.

    Step: a pair of adjacent levels (sigma_n, sigma_{n+1}) of N Karras levels drawn uniformly, x_{n+1} = x0 +
    sigma_{n+1} z, one Heun (or Euler) step of the teacher's ODE to x^_n, and the loss d(f(x_{n+1}, sigma_{n+1}),
    sg f^-(x^_n, sigma_n)) with the target network f^- an EMA of the weights with decay ``mu`` (0: the weights
    themselves, with the same dropout mask).

    Args:
        teacher, dropout: see :class:`~.student.StudentModel`.
        num_levels: N (Song et al. on CIFAR-10: 18).
        solver: ``heun`` (the paper's) or ``euler``.
        mu: the target network's EMA decay (Song et al.: 0.95 on ImageNet 64 and LSUN).
        distance, huber_c, lpips: ``l2`` ||.||^2 (the paper's non-perceptual choice), ``l1``, ``pseudo_huber``, or
            ``lpips`` (the paper's best) with ``lpips`` = local weight files.
        sigma_min, sigma_max, rho: the consistency model's range and its Karras levels (0.002, 80, 7).
        mid_sigmas: the intermediate levels of multistep sampling.
        **kwargs: the :class:`~.base.DiffusionModel` arguments (sampler, optimiser, speed options).
    """

    def __init__(
        self,
        teacher: DiffusionModel | None = None,
        num_levels: int = 18,
        solver: Solver = "heun",
        mu: float = 0.95,
        distance: Distance = "l2",
        huber_c: float | None = None,
        lpips: Mapping[str, str] | None = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        mid_sigmas: Sequence[float] = (0.821,),
        dropout: float | None = None,
        **kwargs: Any,
    ) -> None:
        if solver not in ("heun", "euler"):
            raise UserError(f"solver is heun or euler, got {solver!r}")
        if not 0.0 <= mu < 1.0:
            raise UserError(f"mu is a decay in [0, 1), got {mu}")
        kwargs = {"sampler": {"name": "consistency", "steps": 1}, **kwargs}
        super().__init__(teacher, dropout, recipe=("consistency distillation", "cd"), **kwargs)
        self.save_hyperparameters(ignore=["teacher", "optimizer", "lr_scheduler"])
        self.sigmas = karras_levels(num_levels, sigma_min, sigma_max, rho)
        self.solver, self.mu, self.huber_c = solver, mu, huber_c
        self.distance = DistanceChoice(distance, lpips)
        self.sigma_min, self.sigma_max, self.mid_sigmas = sigma_min, sigma_max, tuple(mid_sigmas)
        self.target_net = copy.deepcopy(self.net).requires_grad_(False) if mu > 0 else None

    def consistency_function(self, net: nn.Module | None = None) -> ConsistencyFunction:
        """f over the student (or over ``net``, the target network), on the teacher's parameterisation."""
        inner = self.vp_denoiser(self.net if net is None else net, self.teacher_prediction_type)
        return ConsistencyFunction(inner, self.sigma_min, self.sigma_max, self.mid_sigmas)

    def denoiser(self) -> ConsistencyFunction:
        return self.consistency_function()

    def loss(self, x0: Tensor, cond: Cond) -> Tensor:
        """Per-sample d(f(x_{n+1}, sigma_{n+1}), sg f^-(x^_n, sigma_n)) with x^_n one teacher ODE step from x_{n+1}."""
        n = torch.randint(0, len(self.sigmas) - 1, (x0.shape[0],))
        lo, hi = self.sigmas[n].to(x0), self.sigmas[n + 1].to(x0)
        x_hi = x0 + append_dims(hi, x0.ndim) * torch.randn_like(x0)
        with torch.no_grad():
            x_lo = ode_step(self.teacher_denoiser(), x_hi, hi, lo, cond, self.solver)
        f_target = self.consistency_function(self.target_net)
        return consistency_loss(self.denoiser(), f_target, x_hi, hi, x_lo, lo, x0, cond, self.distance.kind,
                                self.huber_c,
                                shared_dropout=self.target_net is None,
                                perceptual=self.distance.network(x0.device)).float()  # fmt: skip

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.target_net is not None:
            ema_update(self.target_net, self.net, self.mu)
