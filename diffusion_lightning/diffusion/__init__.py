"""Pure tensor math of diffusion models: no Lightning, no Hydra."""

from .gaussian import Denoiser, GaussianDiffusion, ModelPrediction, gaussian_data_denoiser
from .losses import l_simple, mean_flat
from .samplers import SAMPLERS, ddim_sample, ddpm_sample, dynamic_threshold, sample
from .schedules import cosine_beta_schedule, get_beta_schedule, linear_beta_schedule, space_timesteps

__all__ = [
    "SAMPLERS",
    "Denoiser",
    "GaussianDiffusion",
    "ModelPrediction",
    "cosine_beta_schedule",
    "ddim_sample",
    "ddpm_sample",
    "dynamic_threshold",
    "gaussian_data_denoiser",
    "get_beta_schedule",
    "l_simple",
    "linear_beta_schedule",
    "mean_flat",
    "sample",
    "space_timesteps",
]
