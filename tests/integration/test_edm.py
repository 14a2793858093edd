"""EDM (Karras et al. 2022): the training noise density, the loss weight, the loss itself, and a tiny run end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import QUIET, TINY_NET, folder_data
from torch import nn

from diffusion_lightning.checkpoint import model_from_checkpoint
from diffusion_lightning.diffusion import EDMPrecond
from diffusion_lightning.models import EDM
from diffusion_lightning.nets import UNet
from diffusion_lightning.train import train


def tiny_edm(**kwargs: object) -> EDM:
    net = UNet(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), num_groups=4, dropout=0.0)  # fmt: skip
    return EDM(net, **kwargs)


def draw_sigmas(model: EDM, n: int) -> torch.Tensor:
    """Sigmas drawn as :meth:`EDM.loss` draws them: ln sigma = randn P_std + P_mean."""
    return (torch.randn(n, dtype=torch.float64) * model.p_std + model.p_mean).exp()


def test_training_sigmas_are_lognormal_and_sigma_density_is_their_pdf():
    model = tiny_edm()
    assert (model.p_mean, model.p_std, model.sigma_data) == (-1.2, 1.2, 0.5)
    torch.manual_seed(0)
    log_sigma = draw_sigmas(model, 400_000).log()
    edges = torch.linspace(-6.0, 3.6, 33, dtype=torch.float64)  # P_mean +- 4 P_std
    counts = torch.histc(log_sigma, bins=32, min=-6.0, max=3.6)
    normal = torch.distributions.Normal(-1.2, 1.2)
    expected = 400_000 * (normal.cdf(edges[1:]) - normal.cdf(edges[:-1]))
    assert torch.allclose(counts, expected, rtol=0.05, atol=60)  # ~3 standard deviations of the busiest bins
    # sigma_density against the lognormal pdf written out here, and its integral over sigma
    sigma = torch.logspace(-6, 4, 20001, dtype=torch.float64)
    pdf = torch.exp(-((sigma.log() + 1.2) ** 2) / (2 * 1.2**2)) / (sigma * 1.2 * math.sqrt(2 * math.pi))
    assert torch.allclose(model.sigma_density(sigma), pdf, rtol=1e-12, atol=0)
    assert torch.trapezoid(model.sigma_density(sigma) * sigma, sigma.log()).item() == pytest.approx(1.0, abs=1e-9)


def test_loss_weight_is_one_over_c_out_squared():
    model = tiny_edm(sigma_data=0.5)
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    expected = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(model.loss_weight(sigma), expected, rtol=1e-12)
    _, c_out, _, _ = EDMPrecond(model, sigma_data=0.5).coefficients(sigma)
    assert torch.allclose(model.loss_weight(sigma) * c_out**2, torch.ones_like(sigma), rtol=1e-12)  # lambda c_out^2 = 1


def test_loss_is_the_weighted_denoising_error_of_the_same_draws():
    model = tiny_edm()
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    torch.manual_seed(3)
    loss = model.loss(x0, None)
    torch.manual_seed(3)
    sigma = (torch.randn(6) * 1.2 - 1.2).exp()
    x = x0 + sigma[:, None, None, None] * torch.randn_like(x0)
    with torch.no_grad():
        d = model.denoiser()(x, sigma)
    by_hand = (sigma**2 + 0.25) / (sigma * 0.5) ** 2 * ((d - x0) ** 2).mean(dim=(1, 2, 3))
    assert loss.shape == (6,)
    assert torch.allclose(loss.detach(), by_hand, rtol=1e-5)


class GaussianOptimalF(nn.Module):
    """The network F that makes D the exact denoiser of data N(0, s^2 I): F = (D* - c_skip x) / c_out with
    D*(x) = s^2 x / (s^2 + sigma^2), sigma read back from c_noise = 250 ln sigma."""

    in_channels = out_channels = 1
    image_size = 8
    num_classes = None

    def __init__(self, s: float, sigma_data: float) -> None:
        super().__init__()
        self.s, self.sd = s, sigma_data

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: object = None) -> torch.Tensor:
        sigma = (c_noise / 250).exp().reshape(-1, 1, 1, 1)
        x = x_in * (sigma**2 + self.sd**2).sqrt()
        c_skip = self.sd**2 / (sigma**2 + self.sd**2)
        c_out = sigma * self.sd / (sigma**2 + self.sd**2).sqrt()
        return (self.s**2 * x / (self.s**2 + sigma**2) - c_skip * x) / c_out


def test_the_optimal_denoisers_loss_is_one_at_every_sigma_when_the_data_has_std_sigma_data():
    """E[lambda(sigma) (D*(x) - x0)^2] = lambda s^2 sigma^2 / (s^2 + sigma^2) = 1 for s = sigma_data: the weight makes
    the irreducible loss uniform over noise levels (Karras et al. 2022, Sec. 5)."""
    model = EDM(GaussianOptimalF(0.5, 0.5))
    torch.manual_seed(0)
    x0 = 0.5 * torch.randn(8192, 1, 8, 8)
    loss = model.loss(x0, None).detach()
    assert loss.mean().item() == pytest.approx(1.0, abs=0.02)  # std of the mean ~0.002
    torch.manual_seed(0)
    sigma = draw_sigmas(model, 8192)
    for low, high in ((0.0, 0.1), (0.1, 1.0), (1.0, 100.0)):  # the same at low, middle and high noise
        assert loss[(sigma >= low) & (sigma < high)].mean().item() == pytest.approx(1.0, abs=0.05)


def test_tiny_edm_trains_through_the_entry_and_samples_with_heun(compose_train, image_folder, tmp_path):
    cfg = compose_train(
        ["experiment=edm_fmnist", *folder_data(image_folder), *TINY_NET, *QUIET, "trainer.max_steps=2",
         "trainer.val_check_interval=null", "trainer.limit_val_batches=1", "callbacks.sample_grid.num_samples=4",
         "sampler.steps=3", "callbacks.ema.decay=0.9", "logger=csv"]
    )  # fmt: skip
    assert cfg.model._target_.endswith("EDM") and cfg.sampler.name == "heun"
    assert train(cfg)["trainer"].global_step == 2
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    model = model_from_checkpoint(last)
    assert isinstance(model, EDM) and model.sampler["name"] == "heun"
    for steps in (3, 5):
        images, nfe = model.sample(2, generator=torch.Generator().manual_seed(0), return_nfe=True, steps=steps)
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
        assert nfe == 2 * steps - 1
