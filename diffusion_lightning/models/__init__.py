"""LightningModules: one training recipe each, built from diffusion/ and nets/."""

from .ddpm import DDPM
from .improved_ddpm import ImprovedDDPM

__all__ = ["DDPM", "ImprovedDDPM"]
