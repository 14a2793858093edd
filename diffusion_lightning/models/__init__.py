"""LightningModules: one training recipe each, built from diffusion/ and nets/ on the shared DiffusionModel."""

from .autoencoder import Autoencoder
from .base import DiffusionModel
from .continuous_diffusion import ContinuousDiffusion
from .ddpm import DDPM
from .improved_ddpm import ImprovedDDPM
from .latent_diffusion import LatentDiffusion
from .progressive_distillation import ProgressiveDistillation

__all__ = [
    "DDPM",
    "Autoencoder",
    "ContinuousDiffusion",
    "DiffusionModel",
    "ImprovedDDPM",
    "LatentDiffusion",
    "ProgressiveDistillation",
]
