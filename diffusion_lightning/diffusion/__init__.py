"""Pure tensor math of diffusion models: no Lightning, no Hydra."""

from .gaussian import Denoiser, GaussianDiffusion, ModelPrediction, gaussian_data_denoiser
from .importance import LossSecondMomentResampler, UniformSampler
from .losses import l_simple, mean_flat
from .registry import SAMPLERS, sample
from .samplers import ddim_sample, ddpm_sample, dynamic_threshold
from .schedules import cosine_beta_schedule, get_beta_schedule, linear_beta_schedule, space_timesteps
from .solvers import dpmpp_2m_sample, heun_sample
from .vlb import (
    calc_bpd_loop,
    calc_bpd_stratified,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    normal_kl,
    prior_bpd,
    vlb_terms,
)

__all__ = [
    "SAMPLERS",
    "Denoiser",
    "GaussianDiffusion",
    "LossSecondMomentResampler",
    "ModelPrediction",
    "UniformSampler",
    "calc_bpd_loop",
    "calc_bpd_stratified",
    "cosine_beta_schedule",
    "ddim_sample",
    "ddpm_sample",
    "discretized_gaussian_log_likelihood",
    "dpmpp_2m_sample",
    "dynamic_threshold",
    "gaussian_data_denoiser",
    "get_beta_schedule",
    "heun_sample",
    "hybrid_loss",
    "l_simple",
    "linear_beta_schedule",
    "mean_flat",
    "normal_kl",
    "prior_bpd",
    "sample",
    "space_timesteps",
    "vlb_terms",
]
