"""Continuous-time diffusion on the cosine log-SNR schedule: the teacher recipe of progressive distillation
(Salimans & Ho 2022, Sec. 2 and 4: t ~ U[0, 1], v- or x-prediction, SNR + 1 or truncated-SNR weights)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lightning.diffusion import ContinuousVPDenoiser, CosineSchedule
from diffusion_lightning.diffusion.conditioning import Cond
from diffusion_lightning.diffusion.denoisers import append_dims
from diffusion_lightning.diffusion.gaussian import PredictionType
from diffusion_lightning.diffusion.losses import Weighting, loss_weight, mean_flat

from .base import DiffusionModel


class ContinuousDiffusion(DiffusionModel):
    """A network fed continuous time t on the truncated cosine schedule sigma(t) = tan(a t + b), trained on
    w(sigma) ||x0_hat - x0||^2 with t ~ U[0, 1] and x = x0 + sigma eps (z = alpha x is what the network sees).

    With v-prediction and ``snr+1`` weights this is the v-MSE of the paper's teachers; at t = 1 the log-SNR is
    ``logsnr_min`` = -20 (alpha ~ 5e-5: the prior is pure noise in practice), so a distilled one-step student starts
    from the distribution it was trained on, and x0_hat stays well conditioned there (eps-prediction would divide
    by alpha).

    Args:
        net: the network, called as ``net(z, 1000 t, y)``.
        logsnr_min, logsnr_max: the schedule's truncation (:class:`~diffusion_lightning.diffusion.CosineSchedule`).
        prediction_type: ``v`` (default), ``x0`` or ``eps``.
        weighting: ``snr+1`` (default), ``truncated_snr``, ``snr`` or ``constant`` (:func:`~.losses.loss_weight`).
        **kwargs: the :class:`~.base.DiffusionModel` arguments (sampler, optimiser, speed options, guidance).
    """

    def __init__(
        self,
        net: nn.Module,
        logsnr_min: float = -20.0,
        logsnr_max: float = 20.0,
        prediction_type: PredictionType = "v",
        weighting: Weighting = "snr+1",
        **kwargs: Any,
    ) -> None:
        super().__init__(net, **kwargs)
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler", "first_stage", "conditioner"])
        self.schedule = CosineSchedule(logsnr_min, logsnr_max)
        self.prediction_type, self.weighting = prediction_type, weighting
        loss_weight(torch.ones(1), weighting)  # an unknown weighting fails here
        if net.out_channels != net.in_channels:
            raise ValueError(f"set model.net.out_channels={net.in_channels} (got {net.out_channels})")

    def forward(self, z: Tensor, c_noise: Tensor, cond: Cond = None) -> Tensor:
        return self.network(z, c_noise, cond)

    def denoiser(self) -> ContinuousVPDenoiser:
        return ContinuousVPDenoiser(self, self.schedule, self.prediction_type, "t")

    def loss(self, x0: Tensor, cond: Cond) -> Tensor:
        """Per-sample w(sigma) ||x0_hat - x0||^2 at t ~ U[0, 1], x = x0 + sigma(t) eps."""
        sigma = self.schedule.sigma(torch.rand(x0.shape[0], device=x0.device, dtype=torch.float64))
        x = x0 + append_dims(sigma.to(x0.dtype), x0.ndim) * torch.randn_like(x0)
        x0_hat = self.denoiser()(x, sigma.to(x0.dtype), cond)
        return loss_weight(sigma, self.weighting).float() * mean_flat((x0_hat.float() - x0.float()) ** 2)
