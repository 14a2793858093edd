"""First stages: the space a recipe diffuses in, as a component (Stability-AI/generative-models' ``first_stage_model``).

:class:`PixelSpace` is the identity; :class:`LatentSpace` is latent diffusion's (Rombach et al. 2022, Sec. 3.2) frozen
KL autoencoder with its scale factor: z = s E(x), decoded by D(z / s). Every recipe takes either
(``model.first_stage``); a checkpoint's loader (:func:`diffusion_lightning.checkpoint.load_first_stage`) builds a
:class:`LatentSpace` from a finished ``ae_*`` run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lightning.errors import UserError
from diffusion_lightning.nets.autoencoder import AutoencoderKL, DiagonalGaussian

log = logging.getLogger(__name__)


class PixelSpace(nn.Module):
    """The identity first stage: a pixel model diffuses images in [-1, 1] (no parameters, no state)."""

    #: x0 lies in [-1, 1], so the samplers' clipping and dynamic thresholding apply.
    bounded = True
    #: (C, H, W) of the images; None: the network's input shape.
    image_shape: tuple[int, int, int] | None = None
    latent_shape: tuple[int, int, int] | None = None

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z

    def on_fit_start(self, module: Any) -> None:
        """Called by the recipe when fitting starts (after a checkpoint has been restored)."""


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


class LatentSpace(PixelSpace):
    """A frozen KL autoencoder (eval mode, no gradients, part of the recipe's checkpoint, so a latent checkpoint
    samples on its own) and the scale factor s.

    Args:
        net: the stage-1 :class:`~diffusion_lightning.nets.AutoencoderKL` (its trained weights: from a checkpoint's
            loader, or from the recipe's own state dict when a checkpoint rebuilds it).
        scale_factor: s; None: estimated once when training starts (:meth:`on_fit_start`, after a checkpoint would
            have restored it; the EMA copies it at ``on_train_start``) as 1 / std of the latents of ``scale_batches``
            training batches over all ranks (:func:`latent_scale_factor`), then kept in the checkpoint.
        scale_batches: the number of training batches (per rank) the estimate uses.
    """

    bounded = False  # unit-variance latents are not images (the reference samples latents unclipped)

    def __init__(self, net: AutoencoderKL, scale_factor: float | None = None, scale_batches: int = 16) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.scale_batches = int(scale_batches)
        self.register_buffer("scale_factor", torch.tensor(float("nan") if scale_factor is None else scale_factor))
        self.train(False)  # the mode Lightning records for it when fitting starts and restores after each validation

    @property
    def image_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        return (self.net.in_channels, self.net.image_size, self.net.image_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        return tuple(self.net.latent_shape)

    def train(self, mode: bool = True) -> LatentSpace:
        return super().train(False)  # frozen: no dropout, fixed normalisation, whatever mode the recipe is in

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """z = s * (a sample of q(z | x)) of images x in [-1, 1], in float32 (under bf16 autocast the encoder's output
        is bfloat16: its 8-bit mantissa would quantise the diffusion targets)."""
        posterior = DiagonalGaussian(self.net.encode(x).parameters.float())
        return posterior.sample() * self.scale_factor

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.net.decode(z / self.scale_factor.to(z.dtype))

    def on_fit_start(self, module: Any) -> None:
        """Estimate s from the training data of ``module``'s trainer unless a checkpoint or the config set it."""
        if torch.isfinite(self.scale_factor):
            log.info(f"latent scale factor s = {float(self.scale_factor):.5g} (from the checkpoint or config)")
            return
        trainer = module.trainer
        if getattr(trainer, "datamodule", None) is None:
            raise UserError("estimating the latent scale factor needs the training data module: fit with a datamodule "
                            "or set model.first_stage.scale_factor")  # fmt: skip
        dataset, batch_size = trainer.datamodule.dataset("train"), trainer.datamodule.batch_size
        world, rank, device = trainer.world_size, trainer.global_rank, module.device
        # a fixed random subset (this rank's share) and a seeded side stream for the posterior samples: the estimate
        # neither depends on nor changes training's data order and random draws
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            order = torch.randperm(len(dataset))[rank::world][: self.scale_batches * batch_size].tolist()
            chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            with torch.no_grad():
                latents = (self.net.encode(torch.stack([dataset[i][0] for i in chunk]).to(device)).sample()
                           for chunk in chunks)  # fmt: skip
                s = latent_scale_factor(latents, lambda t: trainer.strategy.reduce(t.to(device), reduce_op="sum").cpu())
        self.scale_factor.fill_(s)
        log.info(f"latent scale factor s = 1 / std(z) = {s:.5g} over {len(order)} training images per rank")
