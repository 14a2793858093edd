"""LightningModules: one training recipe each, built from diffusion/ and nets/."""

from .ddpm import DDPM

__all__ = ["DDPM"]
