"""Denoising networks."""

from diffusion_lightning.nets.unet import UNet

__all__ = ["UNet"]
