"""The latent-diffusion first stage's networks and tensor math: the diagonal Gaussian posterior, the KL autoencoder,
the PatchGAN discriminator, the hinge / adaptive-weight GAN terms and LPIPS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lightning.nets.autoencoder import (
    AutoencoderKL,
    DiagonalGaussian,
    PatchDiscriminator,
    adaptive_gan_weight,
    hinge_d_loss,
)
from diffusion_lightning.nets.lpips import LPIPS

TINY = dict(ch=8, num_res_blocks=1, z_channels=3, num_groups=4)


# --- DiagonalGaussian ---------------------------------------------------------------------------------------------


def test_kl_matches_torch_distributions_closed_form():
    g = torch.Generator().manual_seed(0)
    params = torch.randn(3, 8, 5, 4, generator=g, dtype=torch.float64) * 2
    posterior = DiagonalGaussian(params)
    mean, logvar = params[:, :4], params[:, 4:]
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    assert posterior.kl().shape == (3,)
    torch.testing.assert_close(posterior.kl(), expected, rtol=1e-10, atol=1e-10)
    # nll is the summed Gaussian negative log-density.
    x = torch.randn(3, 4, 5, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(posterior.nll(x), -q.log_prob(x).sum(dim=(1, 2, 3)), rtol=1e-10, atol=1e-10)


def test_kl_is_zero_for_the_prior_and_logvar_is_clamped():
    assert DiagonalGaussian(torch.zeros(2, 6, 3, 3)).kl().abs().max() == 0
    posterior = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), -100.0)], dim=1))
    assert posterior.logvar.item() == -30.0 and posterior.var.item() > 0
    assert DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 100.0)], 1)).logvar == 20


def test_sample_has_the_posterior_moments_and_mode_is_the_mean():
    mean = torch.tensor([-1.0, 0.5, 3.0]).view(1, 3, 1, 1)
    logvar = torch.tensor([0.0, -2.0, 1.0]).view(1, 3, 1, 1)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1).repeat(20000, 1, 1, 1))
    z = posterior.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(z.mean(0).flatten(), mean.flatten(), atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(0).flatten(), torch.exp(0.5 * logvar).flatten(), atol=0.03, rtol=0)
    assert torch.equal(posterior.mode(), posterior.mean)
    # Seeded draws repeat; unseeded ones use the global RNG.
    small = DiagonalGaussian(torch.randn(2, 4, 3, 3))
    a, b = (small.sample(torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, small.sample())


# --- GAN terms ----------------------------------------------------------------------------------------------------


def test_hinge_d_loss_hand_computed():
    real = torch.tensor([2.0, 0.5, -1.0, 0.0])  # relu(1 - r) = 0, 0.5, 2, 1 -> mean 0.875
    fake = torch.tensor([-2.0, 0.5, 1.0, -0.5])  # relu(1 + f) = 0, 1.5, 2, 0.5 -> mean 1.0
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (0.875 + 1.0)))
    assert hinge_d_loss(torch.full((3,), 5.0), torch.full((3,), -5.0)) == 0


def test_adaptive_gan_weight_matches_separate_autograd_and_closed_form():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    target = torch.randn(4, 3)
    out = layer(x)
    rec_loss = (out - target).abs().mean()
    g_loss = -out.mean()
    weight = adaptive_gan_weight(rec_loss, g_loss, layer.weight)
    # Direct autograd, each gradient on its own graph.
    out1, out2 = layer(x), layer(x)
    (rec_grad,) = torch.autograd.grad((out1 - target).abs().mean(), layer.weight)
    (g_grad,) = torch.autograd.grad(-out2.mean(), layer.weight)
    torch.testing.assert_close(weight, rec_grad.norm() / (g_grad.norm() + 1e-4))
    # Closed form for g_loss = -mean(W x + b): dL/dW = -(1 / (4 * 3)) * 1_3 x_sum^T.
    g_closed = -torch.ones(3, 1) * x.sum(0, keepdim=True) / 12
    torch.testing.assert_close(g_grad, g_closed)
    # Detached, and the graphs were retained for the generator's backward.
    assert not weight.requires_grad and weight.grad_fn is None
    (rec_loss + weight * g_loss).backward()
    assert layer.weight.grad is not None


def test_adaptive_gan_weight_is_clamped():
    w = torch.ones(2, requires_grad=True)
    big = adaptive_gan_weight((w * 1e3).sum(), (w * 0).sum(), w)  # zero GAN gradient: 1e3 * sqrt(2) / 1e-4
    assert big.item() == 1e4
    assert adaptive_gan_weight((w * 1e3).sum(), (w * 0).sum(), w, max_weight=5.0).item() == 5.0
    assert adaptive_gan_weight((w * 0).sum(), w.sum(), w).item() == 0.0


# --- AutoencoderKL ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ch_mult, f", [((1, 2), 2), ((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
def test_autoencoder_shapes(ch_mult, f):
    torch.manual_seed(0)
    model = AutoencoderKL(image_size=32, in_channels=3, ch_mult=ch_mult, **TINY)
    assert model.downsampling_factor == f
    assert model.latent_shape == (3, 32 // f, 32 // f)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = model.encode(x)
    assert isinstance(posterior, DiagonalGaussian)
    assert posterior.mean.shape == posterior.logvar.shape == (2, *model.latent_shape)
    assert model.decode(posterior.sample()).shape == x.shape
    rec, post = model(x, sample_posterior=False)
    assert rec.shape == x.shape and post.kl().shape == (2,)
    torch.testing.assert_close(rec, model.decode(post.mode()))
    assert model.last_layer is model.decoder.conv_out.weight and isinstance(model.last_layer, nn.Parameter)


def test_autoencoder_forward_sampling_is_seeded_and_gradients_reach_the_encoder():
    model = AutoencoderKL(image_size=8, in_channels=1, ch_mult=(1, 2), attention=False, **TINY)
    x = torch.randn(2, 1, 8, 8)
    a, _ = model(x, generator=torch.Generator().manual_seed(3))
    b, _ = model(x, generator=torch.Generator().manual_seed(3))
    c, _ = model(x, sample_posterior=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.square().mean().backward()
    assert model.encoder.conv_in.weight.grad is not None and model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_autoencoder_validation():
    with pytest.raises(ValueError, match="image_size=30 is not divisible .*f=.*4"):
        AutoencoderKL(image_size=30, ch_mult=(1, 2, 2), **TINY)
    with pytest.raises(ValueError, match="num_groups=32.*change ch or num_groups"):
        AutoencoderKL(image_size=32, ch=8, num_groups=32)
    model = AutoencoderKL(image_size=16, in_channels=3, ch_mult=(1, 2), **TINY)
    with pytest.raises(ValueError, match="model.first_stage.*data.image_size"):
        model.encode(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="model.first_stage"):
        model.encode(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="latents"):
        model.decode(torch.randn(1, 3, 16, 16))


# --- PatchDiscriminator -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers, side", [(2, 6), (3, 2)])
def test_patch_discriminator_shape(n_layers, side):
    disc = PatchDiscriminator(in_channels=3, ndf=8, n_layers=n_layers)
    logits = disc(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 1, side, side)
    assert disc.output_size(32) == side
    bn = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn) == n_layers and all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bn)
    widths = [m.out_channels for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [8 * min(2**n, 8) for n in range(n_layers + 1)] + [1]


def test_patch_discriminator_too_small_input():
    disc = PatchDiscriminator(in_channels=1, ndf=8, n_layers=3)
    with pytest.raises(ValueError, match="n_layers=3"):
        disc(torch.randn(2, 1, 8, 8))


# --- LPIPS --------------------------------------------------------------------------------------------------------


def _vgg16_feature_keys() -> dict[str, torch.Size]:
    from torchvision.models import vgg16

    with torch.device("meta"):
        return {k: v.shape for k, v in vgg16(weights=None).features.state_dict().items()}


@pytest.fixture
def lpips_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    backbone = {f"features.{k}": torch.randn(shape, generator=g) * (0.05 if k.endswith("weight") else 0.01)
                for k, shape in _vgg16_feature_keys().items()}  # fmt: skip
    backbone["classifier.0.weight"] = torch.zeros(2, 2)  # the full torchvision checkpoint also has these
    widths = (64, 128, 256, 512, 512)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(widths)}
    torch.save(backbone, tmp_path / "vgg16.pth")
    torch.save({k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")},
               tmp_path / "features.pth")  # fmt: skip
    torch.save(lins, tmp_path / "vgg.pth")
    return tmp_path


def test_lpips_distance_properties(lpips_files):
    lpips = LPIPS(lpips_files / "vgg16.pth", lpips_files / "vgg.pth")
    assert all(not p.requires_grad for p in lpips.parameters()) and not lpips.training
    lpips.train()
    assert not lpips.training
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(lpips(x, x), torch.zeros(2))
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(d, lpips(y, x))
    # Gradients reach the input, none are accumulated on the frozen weights.
    x.requires_grad_(True)
    lpips(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())
    # The features-only file gives the same network; grayscale inputs are repeated to RGB.
    same = LPIPS(lpips_files / "features.pth", lpips_files / "vgg.pth")
    torch.testing.assert_close(same(x, y), d)
    gray_x, gray_y = x[:, :1].detach(), y[:, :1]
    torch.testing.assert_close(lpips(gray_x, gray_y), lpips(gray_x.repeat(1, 3, 1, 1), gray_y.repeat(1, 3, 1, 1)))


def test_lpips_matches_an_independent_computation(lpips_files):
    """Recompute Eq. 1 with torchvision's own VGG-16 feature layers (its ``make_layers``, without the classifier)."""
    from torchvision.models.vgg import cfgs, make_layers

    lpips = LPIPS(lpips_files / "vgg16.pth", lpips_files / "vgg.pth")
    backbone = torch.load(lpips_files / "vgg16.pth", weights_only=True)
    lins = torch.load(lpips_files / "vgg.pth", weights_only=True)
    features = make_layers(cfgs["D"]).eval()
    features.load_state_dict({k.removeprefix("features."): v for k, v in backbone.items() if "features" in k})
    g = torch.Generator().manual_seed(2)
    x, y = (torch.rand(1, 3, 24, 24, generator=g) * 2 - 1 for _ in range(2))
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    expected = torch.zeros(1)
    hx, hy = (x - shift) / scale, (y - shift) / scale
    with torch.no_grad():
        for i, (start, stop) in enumerate([(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]):
            hx, hy = features[start:stop](hx.clone()), features[start:stop](hy.clone())
            nx = hx / (hx.norm(dim=1, keepdim=True) + 1e-10)
            ny = hy / (hy.norm(dim=1, keepdim=True) + 1e-10)
            expected += F.conv2d((nx - ny) ** 2, lins[f"lin{i}.model.1.weight"]).mean()
        torch.testing.assert_close(lpips(x, y), expected)


def test_lpips_missing_files_explain_how_to_get_them(tmp_path, lpips_files):
    with pytest.raises(FileNotFoundError, match=r"(?s)nope\.pth.*vgg16-397923af\.pth.*optional"):
        LPIPS(tmp_path / "nope.pth", lpips_files / "vgg.pth")
    with pytest.raises(FileNotFoundError, match=r"(?s)missing\.pth.*lpips.*weights/v0\.1.*optional"):
        LPIPS(lpips_files / "vgg16.pth", tmp_path / "missing.pth")
