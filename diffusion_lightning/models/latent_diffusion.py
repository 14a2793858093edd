"""Latent diffusion (Rombach et al. 2022, Sec. 3.2): DDPM on the latents z = s E(x) of a frozen first-stage
autoencoder, decoded by D(z / s) for grids and metrics, which are computed at the image resolution."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from diffusion_lightning.errors import CheckpointError, UserError
from diffusion_lightning.nets.autoencoder import DiagonalGaussian

from .autoencoder import Autoencoder
from .ddpm import DDPM

log = logging.getLogger(__name__)


def latent_scale_factor(latents: Iterable[Tensor], all_reduce: Callable[[Tensor], Tensor] = lambda t: t) -> float:
    """s = 1 / std(z) over all elements of all ``latents`` (LDM Sec. 4.3.2 / App. G: unit-variance latents).

    The sums (n, sum z, sum z^2) are accumulated in float64 and passed through ``all_reduce`` (a sum over DDP ranks),
    so every rank gets the same s from the latents of all ranks. (The reference code takes 1 / std of the first
    batch of each rank separately: the ranks then train on differently scaled latents.)
    """
    stats = torch.zeros(3, dtype=torch.float64)
    for z in latents:
        z = z.detach().double().flatten()
        count = torch.tensor(float(z.numel()), dtype=torch.float64)
        stats += torch.stack([count, z.sum().cpu(), z.square().sum().cpu()])
    n, total, squares = all_reduce(stats).tolist()
    if n < 2:
        raise ValueError("the latent scale factor needs at least two latent values")
    var = (squares - total**2 / n) / (n - 1)
    return 1.0 / math.sqrt(var)


def load_first_stage(path: str | Path) -> tuple[Autoencoder, dict[str, Any]]:
    """The stage-1 :class:`Autoencoder` of a finished ``ae_*`` run (without its discriminator and perceptual network,
    which only its training needs), with the model config that rebuilds it."""
    from diffusion_lightning.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    config = (checkpoint.get("run_config") or {}).get("model")
    if not config or not str(config.get("_target_", "")).endswith("Autoencoder"):
        raise CheckpointError(
            f"{path} is not a stage-1 autoencoder checkpoint (its model is {config and config.get('_target_')}): "
            "point model.first_stage_ckpt at checkpoints/last.ckpt of an ae_* run"
        )
    # the encoder and decoder only: no discriminator or perceptual network (whose weight files may be gone)
    config = {**config, "discriminator": None, "perceptual": None, "perceptual_weight": 0.0}
    autoencoder = instantiate(config, _convert_="all")
    autoencoder.load_state_dict({k: v for k, v in checkpoint["state_dict"].items()
                                 if not k.startswith(("discriminator.", "perceptual."))})
    return autoencoder, config


class LatentDiffusion(DDPM):
    """DDPM in the latent space of a frozen stage-1 :class:`Autoencoder` (eval mode, no gradients, part of the
    checkpoint, so a stage-2 checkpoint samples on its own).

    Args:
        net: the denoising network over latents: ``in_channels`` = the autoencoder's ``z_channels``, ``image_size`` =
            image size / f.
        first_stage_ckpt: the stage-1 checkpoint (``checkpoints/last.ckpt`` of an ``ae_*`` run).
        first_stage_config: the stage-1 model config as a JSON string, instead of a checkpoint: how a stage-2
            checkpoint rebuilds itself (the weights then come from its own state dict). A string, so that Hydra does
            not build the autoencoder it describes before this does.
        scale_factor: s; None: estimated once when training starts (``on_fit_start``, after a checkpoint would have
            restored it; the EMA copies it at ``on_train_start``) as 1 / std of the latents of ``scale_batches``
            training batches over all ranks (:func:`latent_scale_factor`), then kept in the checkpoint.
        scale_batches: the number of training batches (per rank) the estimate uses.
        **kwargs: the :class:`DDPM` arguments (schedule, prediction type, sampler, optimiser, class conditioning).
    """

    def __init__(
        self,
        net: nn.Module,
        first_stage_ckpt: str | None = None,
        first_stage_config: str | None = None,
        scale_factor: float | None = None,
        scale_batches: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, **kwargs)
        if first_stage_ckpt:
            first_stage, first_stage_config = load_first_stage(first_stage_ckpt)
        elif first_stage_config:
            first_stage_config = json.loads(first_stage_config)
            first_stage = instantiate(first_stage_config, _convert_="all")
        else:
            raise UserError("latent diffusion needs its first stage: set model.first_stage_ckpt=<ae run>/checkpoints/"
                            "last.ckpt, or leave it null in an ldm_* experiment to train or reuse one")
        self.first_stage: Autoencoder = first_stage.eval().requires_grad_(False)
        self.first_stage_config = first_stage_config
        self.scale_batches = scale_batches
        self.register_buffer("scale_factor", torch.tensor(float("nan") if scale_factor is None else scale_factor))
        z_shape = tuple(self.first_stage.latent_shape)
        net_shape = (net.in_channels, net.image_size, net.image_size)
        if z_shape != net_shape:
            raise UserError(
                f"the first stage's latents have shape {z_shape} but the network takes {net_shape}: set "
                f"model.net.in_channels={z_shape[0]} and model.net.image_size={z_shape[1]}"
            )

    # ------------------------------------------------------------------ spaces
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.first_stage.image_shape)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.first_stage.latent_shape)

    def sampler_spec(self, sampler: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
        """As :class:`DDPM`, with ``clip_denoised`` and ``threshold`` off: they clip x0_hat to the image range [-1, 1],
        and unit-variance latents are not images (the reference samples latents unclipped)."""
        return {**super().sampler_spec(sampler, **overrides), "clip_denoised": False, "threshold": None}

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.first_stage.eval()  # frozen: no dropout, fixed normalisation, whatever mode the rest is in
        return self

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """z = s * (a sample of q(z | x)) of images x in [-1, 1], in float32 (under bf16 autocast the encoder's output
        is bfloat16: its 8-bit mantissa would quantise the diffusion targets)."""
        posterior = DiagonalGaussian(self.first_stage.encode(x).parameters.float())
        return posterior.sample() * self.scale_factor

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.first_stage.decode(z / self.scale_factor.to(z.dtype))

    def loss_terms(self, x0: Tensor, y: Tensor | None) -> dict[str, Tensor]:
        return super().loss_terms(self.encode(x0), y)

    # ------------------------------------------------------------------ the scale factor
    def on_fit_start(self) -> None:
        if torch.isfinite(self.scale_factor):
            log.info(f"latent scale factor s = {float(self.scale_factor):.5g} (from the checkpoint or config)")
            return
        datamodule = self.trainer.datamodule
        dataset, batch_size = datamodule.dataset("train"), datamodule.batch_size
        world, rank = self.trainer.world_size, self.global_rank
        # a fixed random subset (this rank's share) and a seeded side stream for the posterior samples: the estimate
        # neither depends on nor changes training's data order and random draws
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(0)
            order = torch.randperm(len(dataset))[rank::world][: self.scale_batches * batch_size].tolist()
            chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            with torch.no_grad():
                latents = (self.first_stage.encode(torch.stack([dataset[i][0] for i in chunk]).to(self.device)).sample()
                           for chunk in chunks)
                s = latent_scale_factor(
                    latents, lambda t: self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum").cpu()
                )
        self.scale_factor.fill_(s)
        log.info(f"latent scale factor s = 1 / std(z) = {s:.5g} over {len(order)} training images per rank")

    # ------------------------------------------------------------------ checkpoints
    def rebuild_kwargs(self) -> dict[str, Any]:
        # rebuild from the stored config, not the stage-1 file (which may be gone); weights come from state_dict
        return {"first_stage_ckpt": None, "first_stage_config": json.dumps(self.first_stage_config)}
