"""One entry for every sampler: ``sample(denoiser, noise, name, steps=..., grid=..., **options) -> SampleOutput``.

It builds the grid (:func:`~.grids.sampling_sigmas`), scales standard-normal ``noise`` to the denoiser's prior at the
first level, applies clipping / thresholding and class labels as denoiser wrappers, runs the sampler and returns the
result with its NFE, counted from the denoiser calls (per batch, i.e. per sample).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .conditioning import Cond
from .denoisers import Clipped, Conditioned, Counted, Denoiser
from .grids import sampling_sigmas
from .samplers import (
    Progress,
    consistency_sample,
    ddim_sample,
    ddpm_sample,
    dpmpp_2m_sample,
    euler_sample,
    heun_sample,
)

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "euler": euler_sample,
    "dpmpp": dpmpp_2m_sample,
    "heun": heun_sample,
    "consistency": consistency_sample,
}


def documented_nfe(name: str, num_sigmas: int) -> int:
    """The cost each sampler documents for a grid of ``num_sigmas`` nonzero levels: 2N - 1 for Heun, else N."""
    return 2 * num_sigmas - 1 if name == "heun" else num_sigmas


class SampleOutput(NamedTuple):
    x: Tensor  # the samples at sigma = 0
    nfe: int  # denoiser evaluations, counted
    sigmas: Tensor  # the grid that was run


SHARED_OPTIONS = ("steps", "grid", "rho", "clip_denoised", "threshold")


def sampler_options(name: str) -> list[str]:
    """The options sampler ``name`` takes besides the shared arguments."""
    shared = {"denoiser", "x", "sigmas", "generator", "progress"}
    return [p for p in inspect.signature(SAMPLERS[name]).parameters if p not in shared]


def check_sampler(name: str, options: Mapping[str, Any]) -> None:
    """Raise ValueError naming the valid choices if ``name`` is no sampler or ``options`` holds a key it does not
    take (the shared grid and clipping keys, or its own options)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(sorted(SAMPLERS))}")
    valid = [*SHARED_OPTIONS, *sampler_options(name)]
    if unknown := sorted(set(options) - set(valid)):
        raise ValueError(f"sampler {name!r} has no option {', '.join(unknown)}; it takes: {', '.join(valid)}")


def sample(
    denoiser: Denoiser,
    noise: Tensor,
    name: str = "ddim",
    *,
    steps: int | str | None = None,
    grid: str | Sequence[float] = "native",
    rho: float = 7.0,
    clip_denoised: bool = True,
    threshold: float | None = None,
    y: Cond = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> SampleOutput:
    """Run sampler ``name`` from ``noise`` ~ N(0, I) on the grid given by ``steps`` / ``grid`` / ``rho``
    (:func:`~.grids.sampling_sigmas`).

    ``clip_denoised`` clips x0_hat to [-1, 1] at every step, ``threshold`` (a percentile) applies Imagen's dynamic
    thresholding instead (neither where the denoiser declares x0 unbounded, a latent model); ``steps`` None: the
    denoiser's own (``default_steps``); ``y`` is the condition (class labels or a
    :class:`~.conditioning.Condition`); ``options`` go to the sampler (e.g. ``eta``, ``variance_type``,
    ``s_churn``).
    """
    check_sampler(name, options)
    sigmas = sampling_sigmas(denoiser, denoiser.default_steps if steps is None else steps, grid, rho)
    wrapped: Denoiser = denoiser
    if (threshold is not None or clip_denoised) and denoiser.bounded:
        wrapped = Clipped(wrapped, threshold)
    if y is not None:
        wrapped = Conditioned(wrapped, y)
    counted = Counted(wrapped)
    x = noise * denoiser.prior_std(float(sigmas[0]))
    out = SAMPLERS[name](counted, x, sigmas, generator=generator, progress=progress, **options)
    return SampleOutput(out, counted.nfe, sigmas)
