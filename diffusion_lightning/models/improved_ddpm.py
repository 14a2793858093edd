"""Improved DDPM (Nichol & Dhariwal, 2021): learned variance, hybrid loss, importance-sampled L_vlb."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffusion_lightning.diffusion.conditioning import Cond
from diffusion_lightning.diffusion.importance import LossSecondMomentResampler, UniformSampler
from diffusion_lightning.diffusion.vlb import hybrid_loss

from .base import LossOutput
from .ddpm import DDPM


class ImprovedDDPM(DDPM):
    """DDPM with the reverse variance learned through iDDPM eq. 15 (``learned_range``).

    The network outputs 2C channels (``net.out_channels = 2 * in_channels``): the mean part
    (eps by default) and the raw interpolation values v. ``loss_type``:
    ``hybrid`` = L_simple + lambda L_vlb with the mean's gradient stopped in L_vlb (eq. 16);
    ``vlb`` = the bound alone; ``simple`` = L_simple (the variance then stays untrained).
    ``timestep_sampler``: ``uniform`` (the paper's choice for L_hybrid) or ``importance``
    (eq. 18, p_t ~ sqrt(E[L_t^2]); the paper's choice for L_vlb). Default: importance for
    ``vlb``, uniform otherwise. Other arguments as :class:`DDPM`.
    """

    def __init__(
        self,
        net: nn.Module,
        loss_type: Literal["hybrid", "vlb", "simple"] = "hybrid",
        lambda_vlb: float = 0.001,
        timestep_sampler: Literal["uniform", "importance"] | None = None,
        num_timesteps: int = 4000,
        beta_schedule: str = "cosine",
        variance_type: str = "learned_range",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            net, num_timesteps=num_timesteps, beta_schedule=beta_schedule, variance_type=variance_type, **kwargs
        )
        self.loss_type, self.lambda_vlb = loss_type, lambda_vlb
        importance = (timestep_sampler or ("importance" if loss_type == "vlb" else "uniform")) == "importance"
        self.timestep_sampler: UniformSampler = (
            LossSecondMomentResampler(num_timesteps) if importance else UniformSampler(num_timesteps)
        )

    def sample_timesteps(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        return self.timestep_sampler.sample(batch_size, device)

    def loss(self, x0: Tensor, cond: Cond) -> LossOutput:
        """L_hybrid (eq. 16), L_vlb or L_simple per sample; ``mse`` and ``vlb`` logged beside it."""
        t, weights = self.sample_timesteps(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        out = self(x_t, t, cond).float()
        terms = hybrid_loss(
            self.diffusion, out, x0, x_t, t, noise, self.prediction_type, self.lambda_vlb, self.loss_type,
            self.variance_type,
        )
        return terms.pop("loss"), {**terms, "_t": t, "weights": weights}

    def on_loss(self, loss: Tensor, extras: dict[str, Tensor], stage: str) -> None:
        """The per-quarter logs, and in training the importance sampler's loss history (eq. 18): every rank keeps the
        same history, recording the whole global batch's terms."""
        super().on_loss(loss, extras, stage)
        if stage == "train" and isinstance(self.timestep_sampler, LossSecondMomentResampler):
            t, vlb = extras["_t"].detach(), extras["vlb"].detach()
            if self.trainer.world_size > 1:
                t, vlb = self.all_gather(t).reshape(-1), self.all_gather(vlb).reshape(-1)
            self.timestep_sampler.update(t.cpu(), vlb.cpu())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["timestep_sampler"] = self.timestep_sampler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "timestep_sampler" in checkpoint:
            self.timestep_sampler.load_state_dict(checkpoint["timestep_sampler"])
