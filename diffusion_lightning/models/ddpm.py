"""DDPM (Ho et al., 2020): L_simple on a U-Net, uniform t, any sampler at inference."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from diffusion_lightning.diffusion import (
    GaussianDiffusion,
    ModelPrediction,
    get_beta_schedule,
    l_simple,
    sample,
)
from diffusion_lightning.diffusion.gaussian import PredictionType, VarianceType


class DDPM(L.LightningModule):
    """Denoising diffusion with the simple loss (DDPM eq. 14) and a fixed reverse variance.

    Args:
        net: the denoising network, called as ``net(x_t, t, y)``; must expose ``image_size``,
            ``in_channels`` and ``num_classes``.
        num_timesteps, beta_schedule, beta_kwargs: the forward process (``beta_schedule`` may be a list).
        prediction_type: what the network predicts: ``eps`` (the paper), ``x0`` or ``v``.
        variance_type: reverse variance for ancestral sampling (``fixed_small`` = beta~_t, ``fixed_large`` = beta_t).
        lr, weight_decay, adam_betas, warmup_steps: Adam(W) with linear warm-up (DDPM: 2e-4, 5000 steps).
        sampler: default sampler settings for :meth:`sample` (``name``, ``steps`` and sampler kwargs).
    """

    def __init__(
        self,
        net: nn.Module,
        num_timesteps: int = 1000,
        beta_schedule: str | Sequence[float] = "linear",
        beta_kwargs: dict[str, float] | None = None,
        prediction_type: PredictionType = "eps",
        variance_type: VarianceType = "fixed_small",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        adam_betas: Sequence[float] = (0.9, 0.999),
        warmup_steps: int = 5000,
        sampler: dict[str, Any] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.diffusion = GaussianDiffusion(get_beta_schedule(beta_schedule, num_timesteps, **(beta_kwargs or {})))
        self.prediction_type = prediction_type
        self.variance_type = variance_type
        self.sampler_defaults = {"name": "ddim", "steps": 50, **(sampler or {})}
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        # The resolved run config (set by the training entry); saved so a checkpoint rebuilds its model.
        self.run_config: dict[str, Any] | None = None

    # ------------------------------------------------------------------ network
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.net.in_channels, self.net.image_size, self.net.image_size)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return self.net(x_t, t, y if self.net.num_classes else None)

    def denoiser(self, y: Tensor | None = None, net: nn.Module | None = None):
        """The network as a pure denoiser (x_t, t) -> ModelPrediction for the samplers."""

        def denoise(x_t: Tensor, t: Tensor) -> ModelPrediction:
            out = self(x_t, t, y) if net is None else net(x_t, t, y)
            return self.diffusion.prediction_from_output(out.float(), x_t, t, self.prediction_type)

        return denoise

    # ------------------------------------------------------------------ training
    def sample_timesteps(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Training timesteps t ~ U{0..T-1} and optional per-sample loss weights (None: all 1)."""
        return torch.randint(0, self.diffusion.num_timesteps, (batch_size,), device=device), None

    def loss_terms(self, x0: Tensor, y: Tensor | None) -> dict[str, Tensor]:
        """Per-sample losses for a batch of clean images: ``loss`` (what is minimised, before any
        ``weights``), ``t`` and, where the recipe has them, ``weights`` and extra diagnostics."""
        t, weights = self.sample_timesteps(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        out = self(x_t, t, y)
        target = self.diffusion.training_target(x0, noise, t, self.prediction_type)
        terms = {"loss": l_simple(out.float(), target), "t": t}
        return terms if weights is None else {**terms, "weights": weights}

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        x0, y = batch
        terms = self.loss_terms(x0, y)
        weighted = terms["loss"] * terms["weights"] if "weights" in terms else terms["loss"]
        loss = weighted.mean()
        train = stage == "train"
        if train and not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}; "
                "lower model.lr, raise warm-up or check the data. Checkpoints already written are kept."
            )
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(x0), sync_dist=not train)
        for name, value in terms.items():
            if name not in ("loss", "t", "weights"):
                self.log(f"{stage}/{name}", value.mean(), batch_size=len(x0), sync_dist=not train)
        self._log_quarters(stage, terms["loss"].detach(), terms["t"])
        return loss, terms

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")[0]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # The same t and noise for a batch at every validation (a smoother curve), drawn outside training's
        # random stream, so validating does not change what training draws next (exact resume).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(batch_idx)
            self._shared_step(batch, "val")

    def _log_quarters(self, stage: str, losses: Tensor, t: Tensor) -> None:
        """The loss per quarter of the timestep range (q0: t < T/4, ..., q3: t >= 3T/4)."""
        quarter = (t * 4) // self.diffusion.num_timesteps
        on_step = stage == "train"
        for q in range(4):
            mask = quarter == q
            if mask.any():
                self.log(
                    f"{stage}/loss_q{q}", losses[mask].mean(), batch_size=int(mask.sum()),
                    on_step=on_step, on_epoch=not on_step, sync_dist=not on_step,
                )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the global gradient norm before any clipping (``train/grad_norm``, as the papers' code logs it)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), batch_size=1)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=hp.lr, betas=tuple(hp.adam_betas), weight_decay=hp.weight_decay
        )
        warmup = max(int(hp.warmup_steps), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        num_samples: int | None = None,
        *,
        x_T: Tensor | None = None,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: Any = None,
        **sampler_kwargs: Any,
    ) -> Tensor:
        """Images in [-1, 1] from the default sampler, or ``name=``/``steps=`` and its kwargs."""
        kwargs = {**self.sampler_defaults, **sampler_kwargs}
        name = kwargs.pop("name")
        if name == "ddpm":
            kwargs.setdefault("variance_type", self.variance_type)
        if x_T is None:
            if num_samples is None:
                raise ValueError("give num_samples or x_T")
            x_T = torch.randn(num_samples, *self.image_shape, generator=generator)
        x_T = x_T.to(self.device)
        if self.net.num_classes and y is None:
            y = torch.randint(0, self.net.num_classes, (x_T.shape[0],), generator=generator)
        y = y.to(self.device) if y is not None else None
        was_training = self.training
        self.eval()
        try:
            x0 = sample(name, self.denoiser(y), self.diffusion, x_T, generator=generator, progress=progress, **kwargs)
        finally:
            self.train(was_training)
        return x0.clamp(-1, 1)

    def setup(self, stage: str) -> None:
        # Distinct noise and timesteps on every DDP rank (rank 0 keeps the seeded stream).
        if stage == "fit" and self.trainer.world_size > 1 and self.global_rank > 0:
            torch.manual_seed(torch.initial_seed() + 1000003 * self.global_rank)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["run_config"] = self.run_config
        checkpoint["rng_states"] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Restoring the RNG makes a resumed run draw the same data order, t and noise as an
        # uninterrupted one (exact when resuming at an epoch boundary on one process).
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])
            if self._trainer is not None and self.trainer.world_size > 1 and self.global_rank > 0:
                torch.manual_seed(int(torch.randint(2**31, (1,))) + 1000003 * self.global_rank)


def _rng_states() -> dict[str, Any]:
    """RNG states as tensors and ints only, so checkpoints load with ``weights_only=True``."""
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), *map(int, np_state[2:4]), float(np_state[4])],
        "python": [list(random.getstate()[1]), random.getstate()[0]],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py_state, version = states["python"]
    random.setstate((version, tuple(py_state), None))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
