"""Flow matching on the straight path (Lipman et al. 2023; Liu et al. 2023, rectified flow; Esser et al. 2024, SD3):
x_t = (1 - t) x0 + t eps for t in [0, 1], and the velocity v = dx_t/dt = eps - x0 that the network learns.

Through the denoiser contract: dividing by 1 - t gives x = x_t / (1 - t) = x0 + sigma eps with sigma = t / (1 - t)
(t = sigma / (1 + sigma)), so :class:`FlowDenoiser` presents a velocity (or x0- or eps-) network as D(x, sigma) and
every sampler, guidance and metric of the package runs on it unchanged. In these coordinates Euler on the contract's
ODE dx/dsigma = (x - D) / sigma (DDIM at eta = 0, :func:`~.samplers.euler_sample`) is exactly Euler on the flow ODE
dx_t/dt = v on the same t grid; Heun differs from Heun in t at second order (both are second order). The grids flow
users expect are uniform in t, optionally with SD3's shift (:func:`flow_sigmas`).

Training draws t from a density (:func:`sample_time`: uniform, or SD3's logit-normal, either shifted) and pairs noise
with data independently (I-CFM) or by minibatch optimal transport (:func:`ot_pairing`, Tong et al. 2024 OT-CFM;
Pooladian et al. 2023).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .conditioning import Cond
from .denoisers import Denoiser, Network, Sigma, append_dims, sigma_batch
from .grids import with_zero

FlowPrediction = Literal["v", "x0", "eps"]
TimeDensity = Literal["uniform", "logit_normal"]


def flow_sigma(t: Tensor) -> Tensor:
    """sigma = t / (1 - t): the contract's noise level of flow time t."""
    return t / (1 - t)


def flow_time(sigma: Tensor) -> Tensor:
    """t = sigma / (1 + sigma): the flow time of noise level sigma."""
    return sigma / (1 + sigma)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift (Esser et al. 2024, eq. 23): t' = s t / (1 + (s - 1) t); s > 1 moves time towards
    noise (s = sqrt(m / n) for m pixels against a base resolution's n), s = 1 is the identity."""
    if shift <= 0:
        raise ValueError(f"the time shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def logit_normal_density(t: Tensor, m: float = 0.0, s: float = 1.0) -> Tensor:
    """The logit-normal density of SD3 eq. 19:
    pi(t) = 1 / (s sqrt(2 pi)) 1 / (t (1 - t)) exp(-(logit t - m)^2 / (2 s^2))."""
    logit = torch.log(t / (1 - t))
    return torch.exp(-((logit - m) ** 2) / (2 * s**2)) / (s * math.sqrt(2 * math.pi) * t * (1 - t))


def sample_time(
    n: int, density: TimeDensity = "logit_normal", m: float = 0.0, s: float = 1.0, shift: float = 1.0,
    device: torch.device | str | None = None, eps: float = 1e-5,
) -> Tensor:
    """n training times in [eps, 1 - eps] (float32): ``uniform`` U(0, 1), or ``logit_normal`` t = sigmoid(m + s n),
    n ~ N(0, 1) (SD3 Sec. 3.1); then :func:`shift_time` (the clamp keeps x0- and eps-prediction's velocity finite).
    Draws of n rows, so DDP's global-batch draws cover them (:mod:`diffusion_lightning.models.global_batch`)."""
    if density == "uniform":
        t = torch.rand(n, device=device)
    elif density == "logit_normal":
        t = torch.sigmoid(m + s * torch.randn(n, device=device))
    else:
        raise ValueError(f"unknown time density {density!r}: use uniform or logit_normal")
    return shift_time(t, shift).clamp(eps, 1 - eps)


def flow_sigmas(steps: int, shift: float = 1.0, t_max: float = 1.0 - 1e-4) -> Tensor:
    """The grid of flow sampling: t_i = i / N for i = N .. 1 (uniform in t), shifted (:func:`shift_time`), the first
    clamped to ``t_max`` (sigma is infinite at t = 1), as sigmas, then 0 (t = 0). Descending, float64."""
    if steps < 1:
        raise ValueError(f"need at least one step, got {steps}")
    t = shift_time(torch.arange(steps, 0, -1, dtype=torch.float64) / steps, shift).clamp(max=t_max)
    return with_zero(flow_sigma(t))


def velocity(out: Tensor, x_t: Tensor, t: Tensor, prediction_type: FlowPrediction = "v") -> Tensor:
    """The velocity v = eps - x0 from the network's output at (x_t, t): v itself, from x0 (v = (x_t - x0) / t) or from
    eps (v = (eps - x_t) / (1 - t)); ``t`` of shape (B,)."""
    t = append_dims(t, x_t.ndim).to(x_t.dtype)
    if prediction_type == "v":
        return out
    if prediction_type == "x0":
        return (x_t - out) / t
    if prediction_type == "eps":
        return (out - x_t) / (1 - t)
    raise ValueError(f"unknown prediction_type {prediction_type!r}: use v, x0 or eps")


def ot_pairing(x0: Tensor, eps: Tensor) -> Tensor:
    """The permutation pi minimising sum_i ||x0_i - eps_pi(i)||^2 over a minibatch (exact: scipy's
    ``linear_sum_assignment`` on the squared distances in float64); x0_i is then paired with eps_pi(i). torchcfm's
    OT-CFM samples pairs from the same plan with replacement; every pair once is the plan itself."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x0.flatten(1).double(), eps.flatten(1).double()).square()
    _, col = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(col, device=x0.device, dtype=torch.long)


class FlowDenoiser(Denoiser):
    """A network fed (x_t, 1000 t, y) on the straight path, presented over sigma = t / (1 - t).

    For x = x0 + sigma eps: t = sigma / (1 + sigma), x_t = x / (1 + sigma), and the output gives x0 = x_t - t v (v),
    x0 itself (x0), or x - sigma eps (eps). The prior is flow matching's own, x_t ~ N(0, I) at the top level (x has
    std 1 + sigma there); the range is t in [t(sigma_min), t_max]; the default grid is uniform in t with the model's
    sampling ``shift`` (:func:`flow_sigmas`).
    """

    def __init__(
        self, net: Network, prediction_type: FlowPrediction = "v", shift: float = 1.0, t_max: float = 1.0 - 1e-4,
        sigma_min: float = 0.002,
    ) -> None:
        if prediction_type not in ("v", "x0", "eps"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}: use v, x0 or eps")
        if not 0.5 < t_max < 1:
            raise ValueError(f"t_max must lie in (0.5, 1), got {t_max}")
        self.net, self.prediction_type, self.shift, self.t_max = net, prediction_type, shift, t_max
        self.sigma_min, self.sigma_max = sigma_min, t_max / (1 - t_max)

    def prior_std(self, sigma: float) -> float:
        return 1.0 + sigma

    def default_sigmas(self, steps: int | str | None) -> Tensor:
        if steps is None or isinstance(steps, str):
            raise ValueError(f"a flow model takes an integer number of steps, got {steps!r}")
        return flow_sigmas(int(steps), self.shift, self.t_max)

    def predict(self, x: Tensor, sigma: Sigma, y: Cond = None) -> tuple[Tensor, Tensor | None]:
        s = sigma_batch(sigma, x)
        t = flow_time(s)
        s = append_dims(s, x.ndim)
        x_t = x / (1 + s)
        out = self.net(x_t, 1000.0 * t, y).to(x.dtype)
        if self.prediction_type == "x0":
            return out, None
        if self.prediction_type == "eps":
            return x - s * out, None
        return x_t - append_dims(t, x.ndim) * out, None
