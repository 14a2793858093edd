"""LightningModules: one training recipe each, built from diffusion/ and nets/ on the shared DiffusionModel."""

from .base import DiffusionModel
from .ddpm import DDPM
from .improved_ddpm import ImprovedDDPM

__all__ = ["DDPM", "DiffusionModel", "ImprovedDDPM"]
