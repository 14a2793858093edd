"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"): the network behind
the preconditioning of Table 1, trained on lognormal noise levels with the weight that makes the effective loss
uniform over sigma, sampled with Heun's 2nd-order method on the rho = 7 grid."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lightning.diffusion import EDMPrecond
from diffusion_lightning.diffusion.conditioning import Cond
from diffusion_lightning.diffusion.denoisers import append_dims
from diffusion_lightning.diffusion.losses import mean_flat
from diffusion_lightning.errors import UserError

from .base import DiffusionModel


class EDM(DiffusionModel):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (:class:`~diffusion_lightning.diffusion.EDMPrecond`) trained
    on lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2 with ln sigma ~ N(P_mean, P_std^2) and lambda(sigma) =
    (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Table 1, eq. 8; NVlabs/edm ``EDMLoss``). The loss is the mean over
    pixels (theirs: the sum, a constant factor).

    Args:
        net: the network F, called as ``net(c_in x, 250 ln sigma, cond)`` (EDM's c_noise = ln(sigma) / 4, scaled for
            the DDPM sinusoidal embedding of this package's U-Net).
        sigma_data, p_mean, p_std: the data's standard deviation and the training noise density (0.5, -1.2, 1.2).
        sigma_min, sigma_max: the sampling range (0.002, 80).
        **kwargs: the :class:`~.base.DiffusionModel` arguments; the sampler defaults to Heun with 18 levels (35 NFE).
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, **{"sampler": {"name": "heun", "steps": 18}, **kwargs})
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler", "first_stage", "conditioner"])
        if net.out_channels != net.in_channels:
            raise UserError(f"set model.net.out_channels={net.in_channels} (got {net.out_channels})")
        if p_std <= 0 or sigma_data <= 0:
            raise UserError(f"need p_std > 0 and sigma_data > 0, got {p_std} and {sigma_data}")
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond = None) -> Tensor:
        return self.network(x, c_noise, cond)

    def denoiser(self) -> EDMPrecond:
        return EDMPrecond(self, self.sigma_data, self.sigma_min, self.sigma_max)

    def sigma_density(self, sigma: Tensor) -> Tensor:
        """p(sigma) of training: the lognormal with ln sigma ~ N(P_mean, P_std^2)."""
        z = (sigma.log() - self.p_mean) / self.p_std
        return torch.exp(-0.5 * z**2) / (sigma * self.p_std * math.sqrt(2 * math.pi))

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def loss(self, x0: Tensor, cond: Cond) -> Tensor:
        """Per-sample lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2 at ln sigma ~ N(P_mean, P_std^2)."""
        sigma = (torch.randn(x0.shape[0], device=x0.device) * self.p_std + self.p_mean).exp()
        x = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * torch.randn_like(x0)
        x0_hat = self.denoiser()(x, sigma.to(x0.dtype), cond)
        return self.loss_weight(sigma) * mean_flat((x0_hat.float() - x0.float()) ** 2)
