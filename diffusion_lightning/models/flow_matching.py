"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024): the network learns the
velocity v = eps - x0 of the straight path x_t = (1 - t) x0 + t eps, with t from a uniform or logit-normal density
(optionally shifted) and noise paired with data independently or by minibatch optimal transport
(:mod:`diffusion_lightning.diffusion.flow`); sampled through the denoiser contract (:class:`FlowDenoiser`)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffusion_lightning.diffusion.conditioning import Cond
from diffusion_lightning.diffusion.denoisers import append_dims
from diffusion_lightning.diffusion.flow import (
    FlowDenoiser,
    FlowPrediction,
    TimeDensity,
    ot_pairing,
    sample_time,
    velocity,
)
from diffusion_lightning.diffusion.losses import mean_flat
from diffusion_lightning.errors import UserError

from .base import DiffusionModel

Coupling = Literal["independent", "ot"]


class FlowMatching(DiffusionModel):
    """Conditional flow matching: per sample ||v_hat(x_t, t) - (eps - x0)||^2 (Lipman et al. eq. 23 on the
    rectified-flow path; SD3 eq. 2 with its v-objective), the network called as ``net(x_t, 1000 t, cond)``.

    Args:
        net: the network; its output is the velocity (``v``), x0 or eps (``prediction_type``), turned into the
            velocity for the loss (so the loss is the same objective whatever the output; x0 and eps weight the
            ends of t differently through the conversion).
        time_density: ``logit_normal`` (SD3's best, with ``logit_mean`` m and ``logit_std`` s) or ``uniform``.
        time_shift: SD3's shift of the training times (eq. 23; 1: none).
        sample_shift: the shift of the sampling grid (uniform t shifted; 1: uniform).
        coupling: ``independent`` (I-CFM) or ``ot`` (OT-CFM: noise paired with data by an exact assignment over the
            global batch: under DDP every rank gathers the batch's images and noise, solves the same assignment and
            keeps its own rows, so W ranks train as one process with the global batch).
        t_max: where sampling starts (sigma = t / (1 - t) is infinite at t = 1).
        **kwargs: the :class:`~.base.DiffusionModel` arguments (sampler, optimiser, guidance, first stage, ...).
    """

    def __init__(
        self,
        net: nn.Module,
        prediction_type: FlowPrediction = "v",
        time_density: TimeDensity = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        time_shift: float = 1.0,
        sample_shift: float = 1.0,
        coupling: Coupling = "independent",
        t_max: float = 1.0 - 1e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, **{"sampler": {"name": "euler", "steps": 50}, **kwargs})
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler", "first_stage", "conditioner", "teacher"])
        if net.out_channels != net.in_channels:
            raise UserError(f"set model.net.out_channels={net.in_channels} (got {net.out_channels})")
        if time_density not in ("uniform", "logit_normal"):
            raise UserError(f"unknown model.time_density={time_density}: use logit_normal or uniform")
        if coupling not in ("independent", "ot"):
            raise UserError(f"unknown model.coupling={coupling}: use independent or ot")
        if logit_std <= 0 or time_shift <= 0 or sample_shift <= 0:
            raise UserError("model.logit_std, model.time_shift and model.sample_shift must be positive")
        self.prediction_type, self.coupling, self.t_max = prediction_type, coupling, t_max
        self.time_density, self.logit_mean, self.logit_std = time_density, logit_mean, logit_std
        self.time_shift, self.sample_shift = time_shift, sample_shift
        self.denoiser()  # an unknown prediction type or t_max fails here

    def forward(self, x_t: Tensor, c_noise: Tensor, cond: Cond = None) -> Tensor:
        return self.network(x_t, c_noise, cond)

    def denoiser(self) -> FlowDenoiser:
        return FlowDenoiser(self, self.prediction_type, self.sample_shift, self.t_max)

    def pair_noise(self, x0: Tensor, eps: Tensor) -> Tensor:
        """The noise each image is paired with: ``eps`` as drawn (independent), or its rows reordered by the OT
        assignment over the global batch (this rank's rows of it)."""
        if self.coupling == "independent":
            return eps
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return eps[ot_pairing(x0, eps)]
        x0_all, eps_all = (self.all_gather(t).flatten(0, 1) for t in (x0, eps))  # (W B, ...) in rank order
        b, rank = x0.shape[0], self.global_rank
        return eps_all[ot_pairing(x0_all, eps_all)][rank * b : (rank + 1) * b]

    def loss(self, x0: Tensor, cond: Cond) -> Tensor:
        """Per-sample flow-matching loss of ``x0`` with fresh noise, paired by the coupling (:meth:`path_loss`)."""
        return self.path_loss(x0, self.pair_noise(x0, torch.randn_like(x0)), cond)

    def path_loss(self, x0: Tensor, eps: Tensor, cond: Cond) -> Tensor:
        """Per-sample ||v_hat - (eps - x0)||^2 (mean over pixels) on the straight path from ``x0`` to its paired
        ``eps``, at t from the time density."""
        t = sample_time(x0.shape[0], self.time_density, self.logit_mean, self.logit_std, self.time_shift, x0.device)
        t_ = append_dims(t, x0.ndim).to(x0.dtype)
        x_t = (1 - t_) * x0 + t_ * eps
        out = self(x_t, 1000.0 * t.to(x0.dtype), cond)
        v_hat = velocity(out.float(), x_t.float(), t, self.prediction_type)
        return mean_flat((v_hat - (eps.float() - x0.float())) ** 2)
