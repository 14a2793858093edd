"""One API for every sampler: ``sample(name, denoiser, diffusion, x_T, steps=..., **kwargs) -> x_0``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from .gaussian import Denoiser, GaussianDiffusion
from .samplers import ddim_sample, ddpm_sample
from .solvers import dpmpp_2m_sample, heun_sample

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpmpp": dpmpp_2m_sample,
    "heun": heun_sample,
}


def sample(name: str, denoiser: Denoiser, diffusion: GaussianDiffusion, x_T: Tensor, **kwargs: Any) -> Tensor:
    """Run the sampler registered as ``name`` (see ``SAMPLERS``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](denoiser, diffusion, x_T, **kwargs)
