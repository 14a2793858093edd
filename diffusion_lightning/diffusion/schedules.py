"""Noise schedules (float64): discrete beta schedules, the continuous cosine log-SNR schedule, and the timestep
sub-sequences of respaced sampling."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def linear_beta_schedule(
    num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None
) -> Tensor:
    """Ho et al. (2020), Sec. 4: betas linear from 1e-4 to 0.02 for T = 1000. For other T both ends scale by 1000 / T
    as in the improved-DDPM reference code (``get_named_beta_schedule``), so that alpha_bar_T stays near the same
    value; explicit ``beta_start``/``beta_end`` are used as given."""
    scale = 1000 / num_timesteps
    start = 1e-4 * scale if beta_start is None else beta_start
    end = 0.02 * scale if beta_end is None else beta_end
    return torch.linspace(start, end, num_timesteps, dtype=torch.float64)


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
    if betas.ndim != 1 or len(betas) == 0 or not bool(((betas > 0) & (betas < 1)).all()):
        # beta = 1 makes alpha_bar_T = 0: sigma_max is infinite and every sample NaN (e.g. the linear schedule's ends
        # scaled by 1000 / T reach 1 at T = 20)
        raise ValueError("betas must be a non-empty 1-D sequence with values in (0, 1): a beta of 1 leaves no signal "
                         "(for the linear schedule use num_timesteps > 20, or give beta_kwargs)")
    return betas


def _require_t(num_timesteps: int | None) -> int:
    if num_timesteps is None or num_timesteps < 1:
        raise ValueError("num_timesteps must be a positive integer for a named schedule")
    return int(num_timesteps)


def space_timesteps(num_timesteps: int, spacing: int | str) -> list[int]:
    """The timesteps (ascending) kept when sampling with fewer steps, exactly as the improved-DDPM reference code
    (``respace.py``) keeps them.

    ``spacing`` is a number of evenly strided steps (``50``), ``"ddimN"`` (the largest integer stride from 0 that
    gives exactly N steps, as in Song et al.'s DDIM code) or a comma list of section counts (``"10,15,20"``: each
    equal section of [0, T) gets that many evenly spaced steps). Within a section the fractional stride is
    accumulated in floating point and each position rounded (Python's round-half-even), as the reference does: the
    positions are not ``round(j * stride)``, which rounds some ties the other way.
    """
    if isinstance(spacing, str):
        if spacing.startswith("ddim"):
            n = int(spacing[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == n:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot get exactly {n} DDIM steps from T={num_timesteps} with an integer stride")
        sections = [int(s) for s in spacing.split(",")]
    else:
        sections = [int(spacing)]
    if any(n < 1 for n in sections):
        raise ValueError(f"step counts must be positive, got {spacing!r}")
    size_per, extra = divmod(num_timesteps, len(sections))
    start, kept = 0, set()
    for i, n in enumerate(sections):
        size = size_per + (1 if i < extra else 0)
        if n > size:
            raise ValueError(f"cannot take {n} steps from a section of {size} (T={num_timesteps})")
        stride = (size - 1) / (n - 1) if n > 1 else 1.0
        position = 0.0
        for _ in range(n):
            kept.add(start + round(position))
            position += stride
        start += size
    return sorted(kept)


class CosineSchedule:
    """The continuous-time cosine schedule of progressive distillation (Salimans & Ho 2022, Sec. 2 and their code's
    ``logsnr_schedule_cosine``): alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2) for t in [0, 1], so the log-SNR is
    lambda(t) = -2 log tan(pi t / 2); it is truncated to [logsnr_min, logsnr_max] by mapping t -> a t + b.

    In the notation x = x0 + sigma eps of Karras et al. (2022) the noise level is sigma = exp(-lambda / 2) =
    tan(a t + b): ``sigma(0) = exp(-logsnr_max / 2)``, ``sigma(1) = exp(-logsnr_min / 2)``.
    """

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> None:
        if logsnr_min >= logsnr_max:
            raise ValueError(f"need logsnr_min < logsnr_max, got {logsnr_min} and {logsnr_max}")
        self.b = math.atan(math.exp(-0.5 * logsnr_max))
        self.a = math.atan(math.exp(-0.5 * logsnr_min)) - self.b

    def sigma(self, t: Tensor | float) -> Tensor:
        """sigma(t) = tan(a t + b) (float64)."""
        return torch.tan(self.a * torch.as_tensor(t, dtype=torch.float64) + self.b)

    def t(self, sigma: Tensor | float) -> Tensor:
        """The inverse, t(sigma) = (atan(sigma) - b) / a (in the dtype of ``sigma``, float64 for a number)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64) if not isinstance(sigma, Tensor) else sigma
        return (torch.atan(sigma) - self.b) / self.a


class DiscreteTime:
    """Continuous time t in [0, 1] over the T levels of a discrete model: level k (0-based) sits at t_k = (k + 1) / T
    and sigma(t) interpolates log sigma linearly between levels (clamped to [sigma_0, sigma_{T-1}] outside [1/T, 1]),
    so that an N-step grid t = i / N (progressive distillation) can be laid over a DDPM-type teacher.
    :meth:`timestep` is the fractional timestep index T t - 1 that such a network is fed (an integer at its levels).
    """

    def __init__(self, sigmas: Tensor) -> None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        if sigmas.ndim != 1 or len(sigmas) < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("DiscreteTime needs the model's levels sigma_t, strictly ascending in t")
        self.num_timesteps = len(sigmas)
        self.knots = torch.arange(1, len(sigmas) + 1, dtype=torch.float64) / len(sigmas)
        self.log_sigmas = sigmas.log()

    def sigma(self, t: Tensor | float) -> Tensor:
        """sigma(t), log-linear between levels (in the dtype and on the device of ``t``; float64 for a number)."""
        t = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, Tensor) else t
        return _interp(t, self.knots, self.log_sigmas).exp()

    def t(self, sigma: Tensor | float) -> Tensor:
        """The inverse of :meth:`sigma` on [sigma_0, sigma_{T-1}]."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64) if not isinstance(sigma, Tensor) else sigma
        return _interp(sigma.log(), self.log_sigmas, self.knots)

    def timestep(self, sigma: Tensor | float) -> Tensor:
        """The fractional timestep index T t(sigma) - 1 in [0, T - 1]."""
        return self.t(sigma) * self.num_timesteps - 1


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x (xp ascending), clamped at the ends; in x's dtype/device."""
    xp, fp = xp.to(x.device), fp.to(x.device)
    xc = x.to(xp.dtype).clamp(float(xp[0]), float(xp[-1]))
    i = torch.searchsorted(xp, xc.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return (f0 + (f1 - f0) * (xc - x0) / (x1 - x0)).to(x.dtype)
