"""LightningModules: one training recipe each, built from diffusion/ and nets/ on the shared DiffusionModel."""

from .autoencoder import Autoencoder
from .base import DiffusionModel
from .ddpm import DDPM
from .improved_ddpm import ImprovedDDPM
from .latent_diffusion import LatentDiffusion

__all__ = ["DDPM", "Autoencoder", "DiffusionModel", "ImprovedDDPM", "LatentDiffusion"]
