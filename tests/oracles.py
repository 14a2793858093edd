"""Test-only oracles: exact denoisers of Gaussian data, whose sampler outputs have moments that can be propagated
exactly (the samplers', the bound's and the distillation targets' tests use them)."""

from __future__ import annotations

from torch import Tensor

from diffusion_lightning.diffusion import GaussianDiffusion
from diffusion_lightning.diffusion.conditioning import Cond
from diffusion_lightning.diffusion.denoisers import Denoiser, Network, Sigma, _extract, append_dims, sigma_batch


class GaussianDenoiser(Denoiser):
    """The exact (Bayes-optimal) denoiser of data x0 ~ N(mu, s^2 I): D(x; sigma) = mu + s^2 (x - mu) / (s^2 + sigma^2).

    Continuous in sigma; every sampler fed it is a chain of affine maps, so its output moments follow exactly (the
    tests propagate them).
    """

    def __init__(self, mu: float, s: float, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        self.mu, self.s, self.sigma_min, self.sigma_max = mu, s, sigma_min, sigma_max

    def predict(self, x: Tensor, sigma: Sigma, y: Cond = None) -> tuple[Tensor, Tensor | None]:
        s2 = append_dims(sigma_batch(sigma, x), x.ndim) ** 2
        return self.mu + self.s**2 * (x - self.mu) / (self.s**2 + s2), None


def gaussian_eps_network(diffusion: GaussianDiffusion, mu: float, s: float) -> Network:
    """The exact eps-prediction network of a discrete VP model for data N(mu, s^2 I): with z_t ~ N(sqrt(abar) mu,
    abar s^2 + 1 - abar), E[eps | z_t] = sqrt(1 - abar) (z_t - sqrt(abar) mu) / (abar s^2 + 1 - abar). Wrapped in a
    :class:`DiscreteVPDenoiser` it is :class:`GaussianDenoiser` at the model's levels."""

    def net(z: Tensor, t: Tensor, y: Cond = None) -> Tensor:
        abar = _extract(diffusion.alphas_cumprod, t, z)
        return (1 - abar).sqrt() * (z - abar.sqrt() * mu) / (abar * s**2 + 1 - abar)

    return net
