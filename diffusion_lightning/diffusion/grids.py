"""Sampling grids: the noise levels a sampler visits, as data (descending float64 sigmas ending with 0).

A sampler takes a grid and never builds one; a denoiser names its own (``Denoiser.default_sigmas``) and
:func:`sampling_sigmas` picks between that, the Karras grid and an explicit list. A grid of N nonzero sigmas costs
N network evaluations with the first-order samplers (2N - 1 with Heun).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .schedules import CosineSchedule, space_timesteps

if TYPE_CHECKING:
    from .denoisers import Denoiser
    from .gaussian import GaussianDiffusion


def with_zero(sigmas: Tensor) -> Tensor:
    """``sigmas`` (descending) followed by the final level 0."""
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho,
    i = 0..n-1 (descending, float64; no trailing zero)."""
    if n < 1:
        raise ValueError(f"need at least one sigma, got steps={n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def karras_grid(denoiser: Denoiser, n: int, rho: float = 7.0) -> Tensor:
    """The Karras grid over the denoiser's range, rounded to its levels (``round_sigma``; the identity for a
    continuous model) with repeats dropped (a discrete model with fewer levels than ``n`` in a stretch), then 0."""
    sigmas = denoiser.round_sigma(karras_sigmas(n, denoiser.sigma_min, denoiser.sigma_max, rho))
    return with_zero(torch.unique_consecutive(sigmas))


def timestep_sigmas(diffusion: GaussianDiffusion, steps: int | str | None) -> Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) at the timesteps that respacing keeps
    (:func:`~.schedules.space_timesteps`; all T for None), descending, then 0."""
    t = range(diffusion.num_timesteps) if steps is None else space_timesteps(diffusion.num_timesteps, steps)
    return with_zero(diffusion.sigmas[list(t)].flip(0))


def uniform_t_sigmas(schedule: CosineSchedule, n: int) -> Tensor:
    """sigma(t) at t = i / n for i = n .. 1 of a continuous schedule (uniform in t), then 0 (t = 0)."""
    if n < 1:
        raise ValueError(f"need at least one step, got {n}")
    t = torch.arange(n, 0, -1, dtype=torch.float64) / n
    return with_zero(schedule.sigma(t))


def explicit_sigmas(sigmas: Sequence[float]) -> Tensor:
    """A grid given as a list of levels (e.g. the intermediate sigmas of multistep consistency sampling): strictly
    descending and positive, 0 appended if it is not the last entry."""
    grid = torch.as_tensor(list(sigmas), dtype=torch.float64)
    if grid.ndim != 1 or len(grid) == 0 or not bool((grid[:-1] > grid[1:]).all()) or grid[0] <= 0:
        raise ValueError(f"an explicit grid must be a strictly descending list of positive sigmas, got {list(sigmas)}")
    return grid if float(grid[-1]) == 0.0 else with_zero(grid)


def sampling_sigmas(
    denoiser: Denoiser, steps: int | str | None = None, grid: str | Sequence[float] = "native", rho: float = 7.0
) -> Tensor:
    """The grid a sampler runs: ``grid="native"`` is the denoiser's own (respaced timesteps for a discrete model,
    uniform t for a continuous VP one, Karras for EDM), ``"karras"`` Karras et al. eq. 5 with ``rho`` over the
    denoiser's range, and a list of floats is used as given."""
    if not isinstance(grid, str):
        return explicit_sigmas(grid)
    if grid == "native":
        return denoiser.default_sigmas(steps)
    if grid == "karras":
        if steps is None or isinstance(steps, str) and not steps.isdigit():
            raise ValueError(f"the karras grid takes an integer number of steps, got {steps!r}")
        return karras_grid(denoiser, int(steps), rho)
    raise ValueError(f"unknown grid {grid!r}: use native, karras or a list of sigmas")
