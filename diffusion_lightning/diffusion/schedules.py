"""Beta schedules (float64), timestep sub-sequences for respaced sampling."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def linear_beta_schedule(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """Ho et al. (2020), Sec. 4: betas linear from 1e-4 to 0.02 (for T=1000)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(t: Tensor | float, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal (2021), eq. 17 numerator: f(t) = cos^2(((t + s) / (1 + s)) pi / 2), t in [0, 1]."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_beta_schedule(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal (2021), eq. 17: alpha_bar_t = f(t)/f(0), beta_t = 1 - alpha_bar_t/alpha_bar_{t-1},
    clipped at ``max_beta`` (0.999) to avoid the singularity at t = T."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = cosine_alpha_bar(steps, s)
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def get_beta_schedule(
    name: str | Sequence[float], num_timesteps: int | None = None, **kwargs: float
) -> Tensor:
    """A schedule by name (``linear`` | ``cosine``) or from an explicit list of betas."""
    if not isinstance(name, str):
        betas = torch.as_tensor(list(name), dtype=torch.float64)
        if num_timesteps is not None and len(betas) != num_timesteps:
            raise ValueError(f"got {len(betas)} betas but num_timesteps={num_timesteps}")
    elif name == "linear":
        betas = linear_beta_schedule(_require_t(num_timesteps), **kwargs)
    elif name == "cosine":
        betas = cosine_beta_schedule(_require_t(num_timesteps), **kwargs)
    else:
        raise ValueError(f"unknown beta schedule {name!r}: use 'linear', 'cosine' or a list of betas")
    if betas.ndim != 1 or len(betas) == 0 or not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError("betas must be a non-empty 1-D sequence with values in (0, 1]")
    return betas


def _require_t(num_timesteps: int | None) -> int:
    if num_timesteps is None or num_timesteps < 1:
        raise ValueError("num_timesteps must be a positive integer for a named schedule")
    return int(num_timesteps)


def space_timesteps(num_timesteps: int, spacing: int | str) -> list[int]:
    """The timesteps (ascending) kept when sampling with fewer steps.

    ``spacing`` is a number of evenly strided steps (``50``), ``"ddimN"`` (stride T//N from 0,
    as in Song et al.'s DDIM code) or a comma list of section counts (``"10,15,20"``, Nichol &
    Dhariwal's respacing: each equal section of [0, T) gets that many evenly spaced steps).
    """
    if isinstance(spacing, str):
        if spacing.startswith("ddim"):
            n = int(spacing[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == n:
                    return list(range(0, num_timesteps, stride))
            if n == num_timesteps:
                return list(range(num_timesteps))
            raise ValueError(f"cannot get exactly {n} DDIM steps from T={num_timesteps}")
        sections = [int(s) for s in spacing.split(",")]
    else:
        sections = [int(spacing)]
    if any(n < 1 for n in sections):
        raise ValueError(f"step counts must be positive, got {spacing!r}")
    size_per = num_timesteps // len(sections)
    extra = num_timesteps % len(sections)
    start, kept = 0, []
    for i, n in enumerate(sections):
        size = size_per + (1 if i < extra else 0)
        if n > size:
            raise ValueError(f"cannot take {n} steps from a section of {size} (T={num_timesteps})")
        stride = (size - 1) / (n - 1) if n > 1 else 1.0
        kept += [start + round(stride * j) for j in range(n)]
        start += size
    return sorted(set(kept))
