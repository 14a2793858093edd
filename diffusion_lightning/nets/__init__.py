"""Networks: the denoising U-Net, the first-stage autoencoder and its discriminator (LPIPS: nets.lpips, optional)."""

from diffusion_lightning.nets.autoencoder import AutoencoderKL, DiagonalGaussian, PatchDiscriminator
from diffusion_lightning.nets.unet import UNet

__all__ = ["AutoencoderKL", "DiagonalGaussian", "PatchDiscriminator", "UNet"]
