"""The denoiser contract every sampler and likelihood computation talks to, and the adapters onto it.

A denoiser is D(x, sigma, y=None) -> x0_hat for x = x0 + sigma * eps, eps ~ N(0, I) (Karras et al. 2022, eq. 2-3:
"EDM space"). It carries its noise range [sigma_min, sigma_max], how it rounds sigma (a discrete-time model only knows
its own levels; a continuous one every sigma), the spread of its prior at sigma_max and its own sampling grid.

A variance-preserving model sees z = alpha x with alpha = 1 / sqrt(1 + sigma^2) (alpha_bar = alpha^2, DDPM eq. 4), so
every VP network -- eps, x0 or v prediction, integer or continuous time -- is presented over sigma by scaling its
input and converting its output (k-diffusion's ``external.py`` adapters; EDM's ``iDDPMPrecond``):

* :class:`DiscreteVPDenoiser`: a network trained on the T timesteps of a :class:`~.gaussian.GaussianDiffusion`
  (DDPM, improved DDPM); sigma is rounded to the nearest of its T levels, and a learned-variance network also
  returns iDDPM's variance values v (eq. 15) for the ancestral sampler;
* :class:`ContinuousVPDenoiser`: a network fed a continuous time t (or the log-SNR) of a
  :class:`~.schedules.CosineSchedule` (progressive distillation);
* :class:`EDMPrecond`: Karras et al.'s preconditioning D = c_skip x + c_out F(c_in x, c_noise), optionally with the
  sigma_min offset of consistency models so that D(x, sigma_min) = x exactly (Song et al. 2023, eq. 7 / App. C).

Wrappers (:class:`Clipped`, :class:`Conditioned`, :class:`Guided`, :class:`Counted`) change one thing and pass the
rest through.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .conditioning import Cond, cond_cat, null_condition
from .gaussian import GaussianDiffusion, PredictionType, _extract
from .grids import karras_grid, timestep_sigmas, uniform_t_sigmas
from .schedules import CosineSchedule, DiscreteTime

Sigma = float | Tensor
# A network as the adapters call it: net(model input, noise conditioning (B,), the condition or None) -> output.
Network = Callable[[Tensor, Tensor, Cond], Tensor]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """``v`` of shape (B,) reshaped to (B, 1, ..., 1) with ``ndim`` dimensions."""
    return v.reshape(-1, *([1] * (ndim - 1)))


def sigma_batch(sigma: Sigma, x: Tensor) -> Tensor:
    """sigma as a (B,) tensor on x's device and in x's dtype (a number or a 0-d tensor is broadcast)."""
    s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    return s.expand(x.shape[0]) if s.ndim == 0 else s.reshape(x.shape[0])


def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Saharia et al. (2022, Imagen) Sec. 2.3: s = max(1, quantile_p |x_0|) per sample, then
    clip to [-s, s] and divide by s."""
    s = torch.quantile(x0.flatten(1).abs().float(), percentile, dim=1).to(x0.dtype)
    s = s.clamp(min=1.0).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


class Denoiser:
    """D(x, sigma, y=None) -> x0_hat for x = x0 + sigma eps (module docstring).

    Subclasses implement :meth:`predict`; the defaults describe a continuous model in EDM's variance-exploding
    form (every sigma is a level, x at sigma_max ~ N(0, sigma_max^2), the Karras grid).
    """

    sigma_min: float
    sigma_max: float
    #: ``predict`` also returns the variance values v of iDDPM eq. 15 (a 2C-channel network).
    learned_variance: bool = False
    #: What the model declares to the samplers: x0 lies in [-1, 1] (``clip_denoised`` and ``threshold`` apply; not
    #: for latents), the reverse variance of ancestral sampling (None: learned_range for a learned-variance model,
    #: else fixed_small), the step count when a call gives none (a distilled model's own; None: the grid's), and
    #: the samplers it is meant for (None: every one; a consistency model: only consistency sampling).
    bounded: bool = True
    variance_type: str | None = None
    default_steps: int | None = None
    samplers: tuple[str, ...] | None = None

    def predict(self, x: Tensor, sigma: Sigma, y: Cond = None) -> tuple[Tensor, Tensor | None]:
        """x0_hat and, for a learned-variance model, the raw variance values v (else None)."""
        raise NotImplementedError

    def __call__(self, x: Tensor, sigma: Sigma, y: Cond = None) -> Tensor:
        return self.predict(x, sigma, y)[0]

    def round_sigma(self, sigma: Tensor) -> Tensor:
        """The noise level the model really evaluates for ``sigma`` (the identity for a continuous model)."""
        return sigma

    def prior_std(self, sigma: float) -> float:
        """Standard deviation of the prior N(0, s^2 I) that sampling from ``sigma`` starts with (VE: sigma)."""
        return sigma

    def default_sigmas(self, steps: int | str | None) -> Tensor:
        """The model's own sampling grid for ``steps`` (descending, ending with 0): here Karras et al. eq. 5."""
        return karras_grid(self, 18 if steps is None else int(steps))


class DiscreteVPDenoiser(Denoiser):
    """A network trained on the timesteps t = 0..T-1 of ``diffusion`` (DDPM eq. 4), presented over sigma.

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t); :meth:`round_sigma` maps any sigma to the nearest sigma_t in
    log sigma (EDM's ``iDDPMPrecond.round_sigma``), and :meth:`predict` runs the network at that timestep on
    z = sqrt(alpha_bar_t) x, converting its eps / x0 / v output with ``diffusion.prediction_from_output``. The prior
    is the VP one, x_T ~ N(0, I) in z, i.e. std sqrt(1 + sigma^2) in x. The default grid is the respaced timesteps of
    :func:`~.schedules.space_timesteps` (a count, ``"ddimN"`` or section counts).
    """

    def __init__(
        self,
        net: Network,
        diffusion: GaussianDiffusion,
        prediction_type: PredictionType = "eps",
        learned_variance: bool = False,
        variance_type: str | None = None,
    ) -> None:
        self.net, self.diffusion, self.prediction_type = net, diffusion, prediction_type
        self.learned_variance, self.variance_type = learned_variance, variance_type
        self.sigmas = diffusion.sigmas  # ascending in t, float64
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])

    @property
    def time(self) -> DiscreteTime:
        """Continuous time over the model's levels (level k at t = (k + 1) / T), for grids uniform in t."""
        return DiscreteTime(self.sigmas)

    def timestep(self, sigma: Sigma) -> Tensor:
        """Index of the level nearest to ``sigma`` in log sigma (long, the shape of ``sigma``, on the CPU)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu().log()
        return (log_sigma[..., None] - self.log_sigmas).abs().argmin(dim=-1)

    def round_sigma(self, sigma: Tensor) -> Tensor:
        return self.sigmas[self.timestep(sigma)].to(device=sigma.device, dtype=sigma.dtype)

    def prior_std(self, sigma: float) -> float:
        return math.sqrt(1.0 + sigma**2)

    def default_sigmas(self, steps: int | str | None) -> Tensor:
        return timestep_sigmas(self.diffusion, steps)

    def predict(self, x: Tensor, sigma: Sigma, y: Cond = None) -> tuple[Tensor, Tensor | None]:
        t = self.timestep(sigma).expand(x.shape[0]).to(x.device)
        z = x * _extract(self.diffusion.sqrt_alphas_cumprod, t, x)
        out = self.net(z, t, y).to(x.dtype)
        pred = self.diffusion.prediction_from_output(out, z, t, self.prediction_type)
        if self.learned_variance != (pred.var_values is not None):
            raise ValueError(
                f"learned_variance={self.learned_variance} but the network returned {out.shape[1]} channels"
            )
        return pred.x0, pred.var_values


class ContinuousVPDenoiser(Denoiser):
    """A network fed continuous time on a :class:`~.schedules.CosineSchedule` (or the :class:`~.schedules.DiscreteTime`
    of a discrete model's levels), presented over sigma.

    The network sees z = alpha x, alpha = 1 / sqrt(1 + sigma^2), and ``time_input="t"`` gives it 1000 t(sigma) (the
    range of the DDPM sinusoidal embedding), ``"logsnr"`` the log-SNR -2 log sigma, ``"timestep"`` the fractional
    timestep index of a :class:`~.schedules.DiscreteTime` (what a network trained on those levels was fed). Its output
    is eps (x0 = x - sigma eps), x0, or v = alpha eps - sigma_vp x0 (x0 = alpha z - sigma_vp v with sigma_vp = sigma
    alpha; Salimans & Ho 2022, Sec. 4). The default grid is uniform in t.
    """

    def __init__(
        self,
        net: Network,
        schedule: CosineSchedule | DiscreteTime | None = None,
        prediction_type: PredictionType = "v",
        time_input: Literal["t", "logsnr", "timestep"] = "t",
    ) -> None:
        if prediction_type not in ("eps", "x0", "v"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}: use 'eps', 'x0' or 'v'")
        if time_input not in ("t", "logsnr", "timestep"):
            raise ValueError(f"unknown time_input {time_input!r}: use 't', 'logsnr' or 'timestep'")
        if time_input == "timestep" and not isinstance(schedule, DiscreteTime):
            raise ValueError("time_input='timestep' needs the DiscreteTime of a discrete model's levels")
        self.net, self.schedule = net, schedule or CosineSchedule()
        self.prediction_type, self.time_input = prediction_type, time_input
        self.sigma_min, self.sigma_max = float(self.schedule.sigma(0.0)), float(self.schedule.sigma(1.0))

    def prior_std(self, sigma: float) -> float:
        return math.sqrt(1.0 + sigma**2)

    def default_sigmas(self, steps: int | str | None) -> Tensor:
        if steps is None or isinstance(steps, str):
            raise ValueError(f"a continuous-time model takes an integer number of steps, got {steps!r}")
        return uniform_t_sigmas(self.schedule, int(steps))

    @property
    def time(self) -> CosineSchedule | DiscreteTime:
        """The model's continuous time t in [0, 1] (``sigma(t)``, ``t(sigma)``)."""
        return self.schedule

    def noise_input(self, sigma: Tensor) -> Tensor:
        """What the network is fed for the noise level: 1000 t(sigma), the log-SNR -2 log sigma, or the timestep."""
        if self.time_input == "timestep":
            return self.schedule.timestep(sigma)
        return 1000.0 * self.schedule.t(sigma) if self.time_input == "t" else -2.0 * sigma.log()

    def predict(self, x: Tensor, sigma: Sigma, y: Cond = None) -> tuple[Tensor, Tensor | None]:
        s = sigma_batch(sigma, x)
        alpha = append_dims((1.0 + s**2).rsqrt(), x.ndim)
        z = alpha * x
        out = self.net(z, self.noise_input(s), y).to(x.dtype)
        s = append_dims(s, x.ndim)
        if self.prediction_type == "eps":
            return x - s * out, None
        if self.prediction_type == "x0":
            return out, None
        return alpha * z - s * alpha * out, None


class EDMPrecond(Denoiser):
    """Karras et al. (2022) Table 1 preconditioning: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, y) with
    c_in = 1 / sqrt(sigma^2 + sigma_data^2) and

    * ``boundary_condition=False`` (EDM): c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),
      c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2);
    * ``boundary_condition=True`` (consistency models, Song et al. 2023 App. C): sigma - sigma_min in place of sigma
      in c_skip and in c_out's numerator, so c_skip(sigma_min) = 1, c_out(sigma_min) = 0 and D(x, sigma_min) = x
      exactly, for any network.

    c_noise = 1000 ln(sigma) / 4, EDM's ln(sigma) / 4 scaled for the DDPM sinusoidal embedding of this package's U-Net
    (as the consistency-models code does for its ADM U-Net). The default grid is Karras et al.'s rho = 7 grid.
    """

    def __init__(
        self,
        net: Network,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        boundary_condition: bool = False,
    ) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.net, self.sigma_data = net, sigma_data
        self.sigma_min, self.sigma_max, self.boundary_condition = sigma_min, sigma_max, boundary_condition

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """c_skip, c_out, c_in, c_noise for a (B,) sigma."""
        sd2 = self.sigma_data**2
        offset = sigma - self.sigma_min if self.boundary_condition else sigma
        c_skip = sd2 / (offset**2 + sd2)
        c_out = offset * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = (sigma**2 + sd2).rsqrt()
        return c_skip, c_out, c_in, 250.0 * sigma.log()

    def predict(self, x: Tensor, sigma: Sigma, y: Cond = None) -> tuple[Tensor, Tensor | None]:
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma_batch(sigma, x))
        out = self.net(append_dims(c_in, x.ndim) * x, c_noise, y).to(x.dtype)
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * out, None


class DenoiserWrapper(Denoiser):
    """Passes everything to ``inner``; subclasses change :meth:`predict`."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner = inner
        self.sigma_min, self.sigma_max = inner.sigma_min, inner.sigma_max
        self.learned_variance, self.bounded = inner.learned_variance, inner.bounded
        self.variance_type, self.default_steps = inner.variance_type, inner.default_steps
        self.samplers = inner.samplers

    def predict(self, x: Tensor, sigma: Sigma, y: Cond = None) -> tuple[Tensor, Tensor | None]:
        return self.inner.predict(x, sigma, y)

    def round_sigma(self, sigma: Tensor) -> Tensor:
        return self.inner.round_sigma(sigma)

    def prior_std(self, sigma: float) -> float:
        return self.inner.prior_std(sigma)

    def default_sigmas(self, steps: int | str | None) -> Tensor:
        return self.inner.default_sigmas(steps)


class Clipped(DenoiserWrapper):
    """x0_hat clipped to [-1, 1], or dynamically thresholded (Imagen) when ``threshold`` is a percentile."""

    def __init__(self, inner: Denoiser, threshold: float | None = None) -> None:
        super().__init__(inner)
        self.threshold = threshold

    def predict(self, x: Tensor, sigma: Sigma, y: Cond = None) -> tuple[Tensor, Tensor | None]:
        x0, v = self.inner.predict(x, sigma, y)
        return (x0.clamp(-1, 1) if self.threshold is None else dynamic_threshold(x0, self.threshold)), v


class Unbounded(DenoiserWrapper):
    """Declares that x0 is no image in [-1, 1] (a latent model's): the samplers neither clip nor threshold it."""

    def __init__(self, inner: Denoiser) -> None:
        super().__init__(inner)
        self.bounded = False


class Conditioned(DenoiserWrapper):
    """The condition ``y`` (labels or a :class:`~.conditioning.Condition`) bound into every call that gives none."""

    def __init__(self, inner: Denoiser, y: Cond) -> None:
        super().__init__(inner)
        self.y = y

    def predict(self, x: Tensor, sigma: Sigma, y: Cond = None) -> tuple[Tensor, Tensor | None]:
        return self.inner.predict(x, sigma, self.y if y is None else y)


class Guided(DenoiserWrapper):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): D_w(x, sigma, y) = D(x, sigma, null) + w (D(x, sigma, y)
    - D(x, sigma, null)), with ``null`` the condition the network was trained to read as "none": for labels the
    class ``null_label``, for tokens and images their null values (:func:`~.conditioning.null_condition`).

    At a fixed x and sigma, x0_hat is affine in eps_hat with weights that sum to one over the two calls (x0 = x - sigma
    eps), so guiding x0_hat is guiding eps_hat exactly as the paper writes it, for every prediction type. w = 1 is the
    conditional denoiser, w = 0 the unconditional one. The two predictions come from one network call on the batch
    stacked twice; a learned variance is the conditional one's (as GLIDE).
    """

    def __init__(self, inner: Denoiser, guidance: float, null_label: int | None = None) -> None:
        super().__init__(inner)
        self.guidance, self.null_label = float(guidance), null_label

    def predict(self, x: Tensor, sigma: Sigma, y: Cond = None) -> tuple[Tensor, Tensor | None]:
        if y is None:
            raise ValueError("classifier-free guidance needs a condition y (class labels, tokens or an image)")
        # a number (or 0-d tensor) is passed on as it is: a float64 sigma must not be rounded to float32 here
        s2 = sigma if not isinstance(sigma, Tensor) or sigma.ndim == 0 else torch.cat([sigma.reshape(-1)] * 2)
        x0, v = self.inner.predict(torch.cat([x, x]), s2, cond_cat([y, null_condition(y, self.null_label)]))
        x0_c, x0_u = x0.chunk(2)
        return x0_u + self.guidance * (x0_c - x0_u), None if v is None else v.chunk(2)[0]


class Counted(DenoiserWrapper):
    """Counts the network evaluations (calls of :meth:`predict`, one per batch) in ``nfe``."""

    def __init__(self, inner: Denoiser) -> None:
        super().__init__(inner)
        self.nfe = 0

    def predict(self, x: Tensor, sigma: Sigma, y: Cond = None) -> tuple[Tensor, Tensor | None]:
        self.nfe += 1
        return self.inner.predict(x, sigma, y)
