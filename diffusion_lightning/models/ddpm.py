"""DDPM (Ho et al., 2020): L_simple on a U-Net, uniform t, any sampler at inference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lightning.diffusion import (
    DiscreteVPDenoiser,
    GaussianDiffusion,
    calc_bpd_loop,
    calc_bpd_stratified,
    get_beta_schedule,
    l_simple,
)
from diffusion_lightning.diffusion.conditioning import Cond
from diffusion_lightning.diffusion.denoisers import Conditioned
from diffusion_lightning.diffusion.gaussian import PredictionType, VarianceType
from diffusion_lightning.errors import CheckpointError, UserError

from .base import DiffusionModel, LossOutput, OptimizerFactory, SchedulerFactory
from .upgrade import upgrade_run_config


class DDPM(DiffusionModel):
    """Denoising diffusion with the simple loss (DDPM eq. 14) on T discrete timesteps.

    Args:
        net: the denoising network, called as ``net(x_t, t, y)``; must expose ``image_size``,
            ``in_channels``, ``out_channels`` and ``num_classes``.
        num_timesteps, beta_schedule, beta_kwargs: the forward process (``beta_schedule`` may be a list).
        prediction_type: what the network predicts: ``eps`` (the paper), ``x0`` or ``v``.
        variance_type: the reverse variance of ancestral sampling and of the bound: ``fixed_small`` = beta~_t,
            ``fixed_large`` = beta_t, ``learned_range`` = iDDPM eq. 15 from the network's second C output channels.
            Decides once whether the variance is learned (``learned_variance``).
        sampler, optimizer, lr_scheduler, channels_last, compile, class_dropout, guidance, first_stage, conditioner:
            see :class:`~.base.DiffusionModel` (latent diffusion, Rombach et al. 2022, is this recipe on a
            :class:`~.first_stage.LatentSpace`).
    """

    def __init__(
        self,
        net: nn.Module,
        num_timesteps: int = 1000,
        beta_schedule: str | Sequence[float] = "linear",
        beta_kwargs: dict[str, float] | None = None,
        prediction_type: PredictionType = "eps",
        variance_type: VarianceType = "fixed_small",
        sampler: Mapping[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        channels_last: bool | None = None,
        compile: bool | None = None,
        class_dropout: float = 0.0,
        guidance: float | None = None,
        first_stage: nn.Module | None = None,
        conditioner: nn.Module | None = None,
    ) -> None:
        super().__init__(net, sampler, optimizer, lr_scheduler, channels_last, compile, class_dropout, guidance,
                         first_stage, conditioner)  # fmt: skip
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler", "first_stage", "conditioner"])
        self.diffusion = GaussianDiffusion(get_beta_schedule(beta_schedule, num_timesteps, **(beta_kwargs or {})))
        self.prediction_type = prediction_type
        if variance_type not in ("fixed_small", "fixed_large", "learned_range"):
            raise ValueError(f"unknown variance_type {variance_type!r}: use fixed_small, fixed_large or learned_range")
        self.variance_type = variance_type
        self.learned_variance = variance_type == "learned_range"
        self._quarter_stats: Tensor | None = None  # training loss per quarter of t since the last logged step
        want = (2 if self.learned_variance else 1) * net.in_channels
        if net.out_channels != want:
            kind = "a learned-variance model needs 2C" if self.learned_variance else "a fixed-variance model needs C"
            raise ValueError(f"{kind} output channels: set model.net.out_channels={want} (got {net.out_channels})")

    # ------------------------------------------------------------------ network
    def forward(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        return self.network(x_t, t, cond)

    def denoiser(self) -> DiscreteVPDenoiser:
        """The network over sigma, declaring the model's reverse variance to ancestral sampling."""
        return DiscreteVPDenoiser(self, self.diffusion, self.prediction_type, self.learned_variance, self.variance_type)

    # ------------------------------------------------------------------ training
    def sample_timesteps(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Training timesteps t ~ U{0..T-1} and optional per-sample loss weights (None: all 1)."""
        return torch.randint(0, self.diffusion.num_timesteps, (batch_size,), device=device), None

    def loss(self, x0: Tensor, cond: Cond) -> LossOutput:
        """L_simple (DDPM eq. 14) per sample at t ~ U{0..T-1}, with ``_t`` (for the per-quarter logs, :meth:`on_loss`)
        and, where :meth:`sample_timesteps` gives them, importance ``weights``."""
        t, weights = self.sample_timesteps(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        out = self(x_t, t, cond)
        target = self.diffusion.training_target(x0, noise, t, self.prediction_type)
        extras = {"_t": t} if weights is None else {"_t": t, "weights": weights}
        return l_simple(out.float(), target), extras

    def on_loss(self, loss: Tensor, extras: dict[str, Tensor], stage: str) -> None:
        self._log_quarters(stage, loss, extras["_t"])

    def _log_quarters(self, stage: str, losses: Tensor, t: Tensor) -> None:
        """The loss per quarter of the timestep range (q0: t < T/4, ..., q3: t >= 3T/4). In training: the mean over
        the steps since the last logged one, summed on the device and logged at logging steps only (no host-device
        synchronisation in between; a quarter with no sample logs nan). In validation: the epoch mean."""
        quarter = (t * 4) // self.diffusion.num_timesteps
        if stage != "train":
            for q in range(4):
                mask = quarter == q
                if mask.any():
                    self.log(f"{stage}/loss_q{q}", losses[mask].mean(), batch_size=int(mask.sum()), sync_dist=True)
            return
        stats = torch.zeros(2, 4, device=losses.device)
        stats[0].index_add_(0, quarter, losses.float())
        stats[1].index_add_(0, quarter, torch.ones_like(losses, dtype=torch.float))
        self._quarter_stats = stats if self._quarter_stats is None else self._quarter_stats + stats
        if self.is_logging_step():
            sums, counts = self._quarter_stats
            self._quarter_stats = None
            for q in range(4):
                self.log(f"train/loss_q{q}", sums[q] / counts[q], batch_size=len(losses))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["betas"] = self.diffusion.betas

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume a run under another forward process (T, schedule or its ends): the network would go on
        training for timesteps that mean other noise levels."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("betas")
        if saved is None and "run_config" in checkpoint:  # written before the betas were saved
            old = upgrade_run_config(checkpoint["run_config"], int(checkpoint.get("format", 1)))["model"]
            saved = get_beta_schedule(old["beta_schedule"], old["num_timesteps"], **(old.get("beta_kwargs") or {}))
        betas = self.diffusion.betas
        if saved is not None and (saved.shape != betas.shape or not torch.allclose(saved, betas, rtol=1e-9, atol=0)):
            raise CheckpointError(
                f"the checkpoint was trained with another noise schedule (T={len(saved)}, beta {float(saved[0]):.4g}"
                f" to {float(saved[-1]):.4g}) than this run's (T={len(betas)}, beta {float(betas[0]):.4g} to "
                f"{float(betas[-1]):.4g}): resume with the model config it was trained with (model.num_timesteps, "
                "model.beta_schedule, model.beta_kwargs)"
            )

    # ------------------------------------------------------------------ likelihood
    def nll_variance_type(self, variance_type: VarianceType | None = None) -> VarianceType:
        """The reverse variance the bound is scored under: the model's own for None; a fixed-variance model also
        takes the other fixed one, a learned-variance model only its own."""
        variance_type = variance_type or self.variance_type
        if (variance_type == "learned_range") != self.learned_variance:
            raise UserError(
                f"variance_type={variance_type} does not fit this {self.variance_type} model: a fixed-variance model "
                "takes fixed_small or fixed_large, a learned-variance one only its own (leave it null)"
            )
        return variance_type

    @torch.no_grad()
    def nll(
        self,
        x0: Tensor,
        y: Tensor | None = None,
        *,
        num_strata: int | None = None,
        clip_denoised: bool = True,
        variance_type: VarianceType | None = None,
        generator: torch.Generator | None = None,
        progress: Any = None,
    ) -> dict[str, Tensor]:
        """The variational bound in bits/dim per image (iDDPM eq. 4-7, prior L_T included) of images x0 in [-1, 1].

        All T terms (``total_bpd``, ``prior_bpd`` and the per-step ``vb`` (B, T)), or with ``num_strata`` the
        unbiased stratified estimate of ``total_bpd`` (K + 1 network calls per image). ``clip_denoised`` clips x0_hat
        as the samplers do; ``variance_type``: see :meth:`nll_variance_type`.
        """
        variance_type = self.nll_variance_type(variance_type)
        cond = self.condition(None, y.to(self.device)) if y is not None and self.num_classes else None
        denoiser = Conditioned(self.denoiser(), cond)
        x0 = x0.to(self.device)
        with self.eval_mode():
            if num_strata:
                return calc_bpd_stratified(
                    denoiser, self.diffusion, x0, variance_type, num_strata, clip_denoised, generator=generator
                )
            return calc_bpd_loop(denoiser, self.diffusion, x0, variance_type, clip_denoised, progress, generator)
