"""Pure tensor math of diffusion models: no Lightning, no Hydra."""

from .denoisers import (
    Clipped,
    Conditioned,
    ContinuousVPDenoiser,
    Counted,
    Denoiser,
    DiscreteVPDenoiser,
    EDMPrecond,
    Guided,
    dynamic_threshold,
)
from .flow import FlowDenoiser
from .gaussian import GaussianDiffusion, ModelPrediction
from .grids import karras_sigmas, sampling_sigmas, timestep_sigmas, uniform_t_sigmas
from .importance import LossSecondMomentResampler, UniformSampler
from .losses import l_simple, mean_flat
from .samplers import consistency_sample, ddim_sample, ddpm_sample, dpmpp_2m_sample, euler_sample, heun_sample
from .sampling import SAMPLERS, SampleOutput, documented_nfe, sample
from .schedules import (
    CosineSchedule,
    cosine_beta_schedule,
    get_beta_schedule,
    linear_beta_schedule,
    space_timesteps,
)
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
    "Clipped",
    "Conditioned",
    "ContinuousVPDenoiser",
    "CosineSchedule",
    "Counted",
    "Denoiser",
    "DiscreteVPDenoiser",
    "EDMPrecond",
    "FlowDenoiser",
    "GaussianDiffusion",
    "Guided",
    "LossSecondMomentResampler",
    "ModelPrediction",
    "SampleOutput",
    "UniformSampler",
    "calc_bpd_loop",
    "calc_bpd_stratified",
    "consistency_sample",
    "cosine_beta_schedule",
    "ddim_sample",
    "ddpm_sample",
    "discretized_gaussian_log_likelihood",
    "documented_nfe",
    "dpmpp_2m_sample",
    "dynamic_threshold",
    "euler_sample",
    "get_beta_schedule",
    "heun_sample",
    "hybrid_loss",
    "karras_sigmas",
    "l_simple",
    "linear_beta_schedule",
    "mean_flat",
    "normal_kl",
    "prior_bpd",
    "sample",
    "sampling_sigmas",
    "space_timesteps",
    "timestep_sigmas",
    "uniform_t_sigmas",
    "vlb_terms",
]
