"""Consistency models (Song et al. 2023; Song & Dhariwal 2023, iCT; Geng et al. 2024, ECT): the consistency function
over the denoiser contract, the noise-level curricula, the distances and the losses. Pure tensor math.

A consistency function f(x, sigma) maps any point of a probability-flow ODE trajectory to its origin, with the
boundary condition f(x, sigma_min) = x. Trained from scratch it is :class:`~.denoisers.EDMPrecond` with
``boundary_condition=True`` (Song et al. 2023, App. C); initialised from a trained diffusion model it is
:class:`ConsistencyFunction` around that model's denoiser. Either is a :class:`~.denoisers.Denoiser`, so the shared
sampling entry runs it (:func:`~.samplers.consistency_sample`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from .conditioning import Cond
from .denoisers import Denoiser, DenoiserWrapper, Sigma, append_dims, sigma_batch
from .grids import karras_sigmas, with_zero

Distance = Literal["l2", "l1", "pseudo_huber", "lpips"]
Perceptual = Callable[[Tensor, Tensor], Tensor]
Solver = Literal["heun", "euler"]


class ConsistencyFunction(DenoiserWrapper):
    """f(x, sigma) = x + (sigma - sigma_min) / sigma (D(x, sigma) - x) for a denoiser D: f(x, sigma_min) = x exactly
    for any D, and f ~ D where sigma >> sigma_min, so a trained diffusion model is a consistency model's starting
    point (consistency distillation and tuning). For D = EDM's preconditioning this is c_skip = (sigma_data^2 + sigma
    sigma_min) / (sigma^2 + sigma_data^2) and Song et al.'s c_out = (sigma - sigma_min) sigma_data / sqrt(sigma^2 +
    sigma_data^2).

    The noise range is the consistency model's own [sigma_min, sigma_max] (Song et al.: [0.002, 80]); the grid of N
    steps is [sigma_max, *mid_sigmas[:N - 1], 0] (multistep consistency sampling, Alg. 1; iCT and ECT use 0.821 for
    two steps on CIFAR-10). ``enforce=False`` passes D through: for one that satisfies the boundary condition itself
    (:class:`~.denoisers.EDMPrecond` with ``boundary_condition=True``, Song et al.'s c_skip and c_out).
    """

    def __init__(
        self,
        inner: Denoiser,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        mid_sigmas: Sequence[float] = (0.821,),
        enforce: bool = True,
    ) -> None:
        super().__init__(inner)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_min, self.sigma_max, self.mid_sigmas = sigma_min, sigma_max, tuple(mid_sigmas)
        self.enforce = enforce
        self.samplers = ("consistency",)

    def predict(self, x: Tensor, sigma: Sigma, y: Cond = None) -> tuple[Tensor, Tensor | None]:
        s = sigma_batch(sigma, x)
        d, _ = self.inner.predict(x, s, y)
        if not self.enforce:
            return d, None
        return x + append_dims((s - self.sigma_min) / s, x.ndim) * (d - x), None

    def round_sigma(self, sigma: Tensor) -> Tensor:
        return sigma

    def default_sigmas(self, steps: int | str | None) -> Tensor:
        return consistency_grid(self, steps)


def consistency_grid(denoiser: Denoiser, steps: int | str | None) -> Tensor:
    """[sigma_max, *mid_sigmas[:steps - 1]] then 0: the levels of multistep consistency sampling (Song et al. 2023,
    Alg. 1) from the model's ``mid_sigmas``."""
    n = 1 if steps is None else int(steps)
    mid = tuple(getattr(denoiser, "mid_sigmas", ()))
    if n < 1 or n - 1 > len(mid):
        raise ValueError(f"{n} consistency steps need {n - 1} intermediate sigmas, the model has {list(mid)}: set "
                         f"model.mid_sigmas, or give sampler.grid=[{denoiser.sigma_max}, ...] explicitly")
    return with_zero(torch.tensor([denoiser.sigma_max, *mid[: n - 1]], dtype=torch.float64))


def karras_levels(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """The N levels sigma_1 = sigma_min < ... < sigma_N = sigma_max of Karras et al. eq. 5 (ascending, float64), the
    discretisation of consistency training and distillation."""
    if n < 2:
        raise ValueError(f"consistency training needs at least 2 levels, got {n}")
    return karras_sigmas(n, sigma_min, sigma_max, rho).flip(0)


# ---------------------------------------------------------------------------------------------------- curricula
def ct_num_levels(k: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """Song et al. (2023) App. C: N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1."""
    return math.ceil(math.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_target_decay(k: int, total_steps: int, s0: int = 2, s1: int = 150, mu0: float = 0.9) -> float:
    """Song et al. (2023) App. C: the target network's EMA decay mu(k) = exp(s0 log(mu0) / N(k))."""
    return math.exp(s0 * math.log(mu0) / ct_num_levels(k, total_steps, s0, s1))


def ict_num_levels(k: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """Song & Dhariwal (2023) eq. 8: N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0)
    + 1)): the levels double every K' steps (every step where K is shorter than the doublings)."""
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** math.floor(k / k_prime), s1) + 1


def lognormal_level_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """Song & Dhariwal (2023) eq. 10: p(sigma_i) proportional to erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) -
    erf((ln sigma_i - P_mean) / (sqrt 2 P_std)) for the pairs i = 1..N-1 of the ascending ``sigmas``."""
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2.0) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def ect_r(t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """Geng et al. (2024), ECT's mapping from t to the earlier level r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))),
    clamped at 0: the gap t - r shrinks by q every stage, relatively more at small t."""
    return (t * (1.0 - q ** -(stage + 1) * (1.0 + k * torch.sigmoid(-b * t)))).clamp(min=0.0)


# ---------------------------------------------------------------------------------------------------- distances
def pseudo_huber(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Song & Dhariwal (2023) eq. 9, per sample: sqrt(||x - y||^2 + c^2) - c (c = 0: the L2 norm, ECT's)."""
    return ((x - y).square().flatten(1).sum(1) + c * c).sqrt() - c


def huber_c(x: Tensor) -> float:
    """iCT's c = 0.00054 sqrt(d) for samples of d = C H W dimensions."""
    return 0.00054 * math.sqrt(x[0].numel())


def distance(
    x: Tensor, y: Tensor, kind: Distance = "pseudo_huber", c: float | None = None, perceptual: Perceptual | None = None
) -> Tensor:
    """Per-sample d(x, y): ``l2`` ||x - y||^2, ``l1`` ||x - y||_1, ``pseudo_huber`` with c (None: iCT's
    0.00054 sqrt(d)), or ``lpips``: ``perceptual`` (an LPIPS network) on both images resized to 224 x 224 bilinearly,
    as Song et al. (2023) compute it."""
    if kind == "l2":
        return (x - y).square().flatten(1).sum(1)
    if kind == "l1":
        return (x - y).abs().flatten(1).sum(1)
    if kind == "pseudo_huber":
        return pseudo_huber(x, y, huber_c(x) if c is None else c)
    if kind == "lpips":
        if perceptual is None:
            raise ValueError("the lpips distance needs the LPIPS network (local weights)")
        up = [torch.nn.functional.interpolate(v, size=(224, 224), mode="bilinear") for v in (x, y)]
        return perceptual(*up).reshape(x.shape[0])
    raise ValueError(f"unknown distance {kind!r}: use l2, l1, pseudo_huber or lpips")


# ---------------------------------------------------------------------------------------------------- one ODE step
@torch.no_grad()
def ode_step(
    denoiser: Denoiser, x: Tensor, sigma: Tensor, sigma_next: Tensor, y: Cond = None, solver: Solver = "heun"
) -> Tensor:
    """One step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. eq. 3) from ``sigma``
    to ``sigma_next`` (both (B,), sigma_next > 0): Euler, or Heun's trapezoid (consistency distillation's solver)."""
    s, s_next = append_dims(sigma, x.ndim), append_dims(sigma_next, x.ndim)
    d = (x - denoiser(x, sigma, y)) / s
    x_next = x + (s_next - s) * d
    if solver == "euler":
        return x_next
    if solver != "heun":
        raise ValueError(f"unknown solver {solver!r}: use heun or euler")
    d_next = (x_next - denoiser(x_next, sigma_next, y)) / s_next
    return x + (s_next - s) * 0.5 * (d + d_next)


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    torch.cuda.set_rng_state(state, device) if device.type == "cuda" else torch.set_rng_state(state)


def consistency_loss(
    f: Denoiser,
    f_target: Denoiser,
    x: Tensor,
    sigma: Tensor,
    x_prev: Tensor,
    sigma_prev: Tensor,
    x0: Tensor,
    y: Cond = None,
    kind: Distance = "pseudo_huber",
    c: float | None = None,
    shared_dropout: bool = True,
    perceptual: Perceptual | None = None,
) -> Tensor:
    """Per-sample d(f(x, sigma), sg f_target(x_prev, sigma_prev)) (Song et al. 2023, eq. 7 / 10): ``x`` at the higher
    level, ``x_prev`` at the adjacent lower one. Where sigma_prev < f's sigma_min (ECT's r = 0) the target is x0.
    With ``shared_dropout`` the target's call replays the random stream of the student's, so both draw the same dropout
    masks (iCT, ECT); the stream then stands where the student's call left it."""
    state = _rng_state(x.device)
    pred = f(x, sigma, y)
    with torch.no_grad():
        if shared_dropout:
            _set_rng_state(x.device, state)
        target = f_target(x_prev, sigma_prev.clamp(min=f.sigma_min), y)
        below = append_dims(sigma_prev < f.sigma_min, x.ndim)
        target = torch.where(below, x0, target.to(pred.dtype))
    return distance(pred, target, kind, c, perceptual)


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, mu: float) -> None:
    """theta^- <- mu theta^- + (1 - mu) theta (Song et al. 2023, Alg. 2 / 3: the target network)."""
    for t, p in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(p.detach(), 1.0 - mu)
