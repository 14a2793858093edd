"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper, label dropout and guided sampling.

For class-conditional Gaussian data -- x0 | c ~ N(mu_c, s_c^2 I), and the null class read as N(mu_u, s_u^2 I) -- both
exact denoisers are affine in x, so the guided one D_w = D_u + w (D_c - D_u) is affine too: D_w(x) = A x + B. A sampler
fed it is then a chain of affine maps (plus fresh noise), and its output moments follow exactly; the propagation below
is written from the samplers' equations in EDM coordinates, independently of the library.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lightning.diffusion import Denoiser, Guided, sample
from diffusion_lightning.diffusion.conditioning import drop_condition
from diffusion_lightning.errors import UserError
from diffusion_lightning.models import DDPM
from diffusion_lightning.nets import UNet

MU = {0: -0.4, 1: 0.5}  # per-class means; the null class (label 2) is the unconditional N(MU_U, S_U^2)
S = {0: 0.3, 1: 0.2}
MU_U, S_U, NULL = 0.05, 0.6, 2
SIGMA_MAX = 80.0


class ClassGaussians(Denoiser):
    """The exact denoiser of N(mu_y, s_y^2 I) for each label y (the null label: the unconditional Gaussian)."""

    sigma_min, sigma_max = 0.002, SIGMA_MAX

    def predict(self, x, sigma, y=None):
        mu = torch.tensor([MU.get(int(c), MU_U) for c in y], dtype=x.dtype)[:, None]
        s2 = torch.tensor([S.get(int(c), S_U) ** 2 for c in y], dtype=x.dtype)[:, None]
        sig2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2
        return mu + s2 * (x - mu) / (s2 + sig2), None


def guided_affine(c: int, w: float, sigma: float) -> tuple[float, float]:
    """(A, B) of D_w(x) = A x + B at ``sigma`` for class c."""
    k_c, k_u = S[c] ** 2 / (S[c] ** 2 + sigma**2), S_U**2 / (S_U**2 + sigma**2)
    a = (1 - w) * k_u + w * k_c
    b = (1 - w) * (1 - k_u) * MU_U + w * (1 - k_c) * MU[c]
    return a, b


def propagate(grid: list[float], c: int, w: float, eta: float) -> tuple[float, float]:
    """DDIM eq. 12/16 in x = z / alpha (eta = 0: Euler): x_next = D + s_down (x - D) / t + s_up z with
    s_up^2 = eta^2 t_next^2 (t^2 - t_next^2) / t^2, s_down^2 = t_next^2 - s_up^2; the step to 0 returns D."""
    m, v = 0.0, grid[0] ** 2
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        a, b = guided_affine(c, w, t)
        if t_next == 0:
            return a * m + b, a**2 * v
        up2 = eta**2 * t_next**2 * (t**2 - t_next**2) / t**2
        r = math.sqrt(t_next**2 - up2) / t
        m, v = (a * (1 - r) + r) * m + (1 - r) * b, (a * (1 - r) + r) ** 2 * v + up2
    return m, v


@pytest.mark.parametrize(("w", "eta"), [(0.0, 0.0), (1.0, 0.0), (3.0, 0.0), (3.0, 1.0), (1.5, 1.0)])
def test_guided_sampler_matches_the_propagated_moments(w, eta):
    c, n, d = 1, 20_000, 4
    grid = [SIGMA_MAX * (0.002 / SIGMA_MAX) ** (i / 11) for i in range(12)] + [0.0]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.full((n,), c)
    out = sample(Guided(ClassGaussians(), w, NULL), noise, "ddim", grid=grid, y=y, eta=eta, generator=g,
                 clip_denoised=False)
    m, v = propagate(grid, c, w, eta)
    se = math.sqrt(v / out.x.numel())
    assert out.x.mean().item() == pytest.approx(m, abs=5 * se)
    assert out.x.var().item() == pytest.approx(v, rel=0.03)
    assert out.nfe == len(grid) - 1  # one (doubled-batch) network call per level


def test_guidance_one_is_conditional_zero_is_unconditional_and_it_extrapolates():
    x = torch.randn(6, 3, dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.0, 2.0, 0.1, 3.0, 0.7], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    base = ClassGaussians()
    cond = base(x, sigma, y)
    uncond = base(x, sigma, torch.full_like(y, NULL))
    torch.testing.assert_close(Guided(base, 1.0, NULL)(x, sigma, y), cond)
    torch.testing.assert_close(Guided(base, 0.0, NULL)(x, sigma, y), uncond)
    torch.testing.assert_close(Guided(base, 4.0, NULL)(x, sigma, y), uncond + 4 * (cond - uncond))
    with pytest.raises(ValueError, match="labels"):
        Guided(base, 2.0, NULL)(x, sigma)


def tiny_conditional(class_dropout: float = 0.1, guidance: float | None = None) -> DDPM:
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), dropout=0.0, num_groups=4, num_classes=3)
    for p in net.parameters():  # the zero-initialised output layers would hide any label dependence
        p.data.add_(0.05 * torch.randn_like(p))
    return DDPM(net, num_timesteps=50, class_dropout=class_dropout, guidance=guidance,
                sampler={"name": "ddim", "steps": 4})


def test_label_dropout_replaces_labels_by_the_null_class_at_rate_p():
    model = tiny_conditional(class_dropout=0.25)
    y = torch.randint(0, 3, (40_000,))
    dropped = drop_condition(model.condition(None, y), model.class_dropout, model.num_classes)
    null = dropped == 3
    assert null.float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert torch.equal(dropped[~null], y[~null])
    off = tiny_conditional(class_dropout=0.0)
    assert torch.equal(drop_condition(off.condition(None, y), off.class_dropout, off.num_classes), y)


def test_model_sampling_under_guidance_uses_the_guided_denoiser():
    model = tiny_conditional(guidance=2.0).eval()
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0])
    kw = dict(noise=noise, y=y, clip_denoised=False)
    guided, nfe = model.sample(**kw, return_nfe=True)
    cond, uncond = model.sample(**kw, guidance=1.0), model.sample(**kw, guidance=0.0)
    assert nfe == 4 and not torch.allclose(cond, uncond)
    # one step of the sampler's first level: x0 under w=2 is 2 x0_c - x0_u at the same x
    d = model.denoiser()
    x, s = noise.double() * 10, torch.tensor(5.0)
    want = 2 * d(x.float(), s, y) - d(x.float(), s, torch.full_like(y, 3))
    torch.testing.assert_close(model.guided_denoiser(2.0)(x.float(), s, y), want, rtol=1e-4, atol=1e-5)
    assert guided.shape == cond.shape == (4, 1, 8, 8)


def test_guidance_is_refused_where_the_null_class_was_never_trained():
    with pytest.raises(UserError, match="class_dropout"):
        tiny_conditional(class_dropout=0.0).sample(2, guidance=3.0)
    unconditional = DDPM(UNet(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                              attention_resolutions=(), num_groups=4), num_timesteps=50)
    with pytest.raises(UserError, match="class-conditional"):
        unconditional.sample(2, guidance=3.0)


def test_class_accuracy_is_the_share_of_samples_classified_as_their_label():
    """From the logits the metrics already extract (no second pass): 3 of 5 labels agree with the classifier."""
    from diffusion_lightning.metrics import SampleQuality, compute_reference_stats, from_uint8, get_extractor

    extractor = get_extractor("fmnist-classifier")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 1, 32, 32), generator=g).to(torch.uint8)
    predicted = extractor(images)["logits"].argmax(1)
    labels = predicted.clone()
    labels[[1, 3]] = (predicted[[1, 3]] + 1) % 10  # two wrong
    reference = torch.randint(0, 256, (200, 1, 32, 32), generator=g).to(torch.uint8)
    quality = SampleQuality(extractor, kid_subset_size=5, kid_subsets=2, is_splits=1)
    quality.set_reference(compute_reference_stats([from_uint8(reference)], extractor, keep_features=True))
    quality.update(images, labels)
    assert quality.compute()["class_accuracy"] == pytest.approx(3 / 5)
    quality.reset()
    quality.update(images)  # unlabelled samples: no accuracy
    assert "class_accuracy" not in quality.compute()
