"""LightningModules: one training recipe each, built from diffusion/ and nets/ on the shared DiffusionModel."""

from .autoencoder import Autoencoder
from .base import DiffusionModel
from .consistency_distillation import ConsistencyDistillation
from .consistency_training import ConsistencyTraining
from .consistency_tuning import ConsistencyTuning
from .continuous_diffusion import ContinuousDiffusion
from .ddpm import DDPM
from .edm import EDM
from .first_stage import LatentSpace, PixelSpace
from .flow_matching import FlowMatching
from .improved_ddpm import ImprovedDDPM
from .progressive_distillation import ProgressiveDistillation
from .reflow import Reflow

__all__ = [
    "DDPM",
    "Autoencoder",
    "ConsistencyDistillation",
    "ConsistencyTraining",
    "ConsistencyTuning",
    "ContinuousDiffusion",
    "DiffusionModel",
    "EDM",
    "FlowMatching",
    "ImprovedDDPM",
    "LatentSpace",
    "PixelSpace",
    "ProgressiveDistillation",
    "Reflow",
]
