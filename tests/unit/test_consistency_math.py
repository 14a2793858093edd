"""Consistency models: the consistency function's boundary condition and coefficients, the curricula and level
probabilities against the papers' formulas, the distances, and CT / CD learning the exact consistency function of
Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion_lightning.diffusion import ContinuousVPDenoiser, CosineSchedule, EDMPrecond, sample
from diffusion_lightning.diffusion.consistency import (
    ConsistencyFunction,
    consistency_loss,
    ct_num_levels,
    ct_target_decay,
    distance,
    ect_r,
    ict_num_levels,
    karras_levels,
    lognormal_level_probs,
    pseudo_huber,
)

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def _random_net(channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1)

    class Net(nn.Module):
        def forward(self, x, c_noise, y=None):
            return conv(x) * 10 + c_noise.reshape(-1, 1, 1, 1)

    return Net()


@pytest.mark.parametrize("kind", ["edm_boundary", "edm_wrapped", "vp_v", "vp_eps"])
def test_f_at_sigma_min_is_the_identity_exactly_for_any_network(kind):
    net = _random_net()
    if kind == "edm_boundary":
        f = EDMPrecond(net, sigma_min=SIGMA_MIN, boundary_condition=True)
    elif kind == "edm_wrapped":
        f = ConsistencyFunction(EDMPrecond(net), SIGMA_MIN, SIGMA_MAX)
    else:
        vp = ContinuousVPDenoiser(net, CosineSchedule(), "v" if kind == "vp_v" else "eps")
        f = ConsistencyFunction(vp, SIGMA_MIN, SIGMA_MAX)
    x = torch.randn(4, 3, 8, 8) * 5
    assert torch.equal(f(x, SIGMA_MIN), x)
    assert not torch.allclose(f(x, 0.01), x)  # the network does act above sigma_min


def test_c_skip_and_c_out_match_their_closed_forms():
    sd = 0.5
    precond = EDMPrecond(lambda x, c, y: x, sigma_data=sd, sigma_min=SIGMA_MIN, boundary_condition=True)
    for sigma in (0.002, 0.01, 0.3, 1.0, 5.0, 80.0):
        c_skip, c_out, c_in, _ = precond.coefficients(torch.tensor([sigma], dtype=torch.float64))
        assert float(c_skip) == pytest.approx(sd**2 / ((sigma - SIGMA_MIN) ** 2 + sd**2), rel=1e-12)
        assert float(c_out) == pytest.approx((sigma - SIGMA_MIN) * sd / math.sqrt(sigma**2 + sd**2), rel=1e-12, abs=0)
        assert float(c_in) == pytest.approx(1 / math.sqrt(sigma**2 + sd**2), rel=1e-12)
    # the wrapper over plain EDM: Song et al.'s c_out and c_skip = (sd^2 + sigma sigma_min) / (sigma^2 + sd^2)
    out = torch.full((1, 2), 0.7, dtype=torch.float64)
    f = ConsistencyFunction(EDMPrecond(lambda x, c, y: out, sigma_data=sd), SIGMA_MIN, SIGMA_MAX)
    x = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    for sigma in (0.01, 1.0, 80.0):
        c_skip = (sd**2 + sigma * SIGMA_MIN) / (sigma**2 + sd**2)
        c_out = (sigma - SIGMA_MIN) * sd / math.sqrt(sigma**2 + sd**2)
        torch.testing.assert_close(f(x, sigma), c_skip * x + c_out * out, rtol=1e-12, atol=1e-12)


def test_ct_curriculum_and_target_decay_follow_song_et_al():
    K, s0, s1, mu0 = 800_000, 2, 150, 0.9
    for k in (0, 1, 1000, 123_456, 400_000, 799_999, 800_000):
        n = math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1
        assert ct_num_levels(k, K, s0, s1) == n
        assert ct_target_decay(k, K, s0, s1, mu0) == pytest.approx(math.exp(s0 * math.log(mu0) / n))
    assert ct_num_levels(0, K, s0, s1) == 2 and ct_num_levels(K, K, s0, s1) == 151
    assert ct_target_decay(0, K, s0, s1, mu0) == pytest.approx(0.9)


def test_ict_curriculum_doubles_from_s0_to_s1():
    # K = 400k, s0 = 10, s1 = 1280: K' = floor(400k / (log2 128 + 1)) = 50k steps per doubling
    K = 400_000
    expected = {0: 11, 49_999: 11, 50_000: 21, 100_000: 41, 199_999: 81, 300_000: 641, 350_000: 1281, 399_999: 1281}
    for k, n in expected.items():
        assert ict_num_levels(k, K, 10, 1280) == n, k


def test_lognormal_level_probabilities_are_the_erf_differences():
    sigmas = karras_levels(12)
    p = lognormal_level_probs(sigmas, -1.1, 2.0)
    cdf = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in sigmas.tolist()]
    raw = [hi - lo for lo, hi in zip(cdf[:-1], cdf[1:], strict=True)]
    torch.testing.assert_close(p, torch.tensor(raw, dtype=torch.float64) / sum(raw), rtol=1e-12, atol=0)
    assert len(p) == 11 and float(p.sum()) == pytest.approx(1.0)
    # the most likely pair straddles exp(P_mean) ~ 0.33 in log sigma's density: not the first or the last pair
    assert 0 < int(p.argmax()) < 10
    torch.testing.assert_close(karras_levels(2), torch.tensor([SIGMA_MIN, SIGMA_MAX], dtype=torch.float64))


def test_pseudo_huber_gradient_matches_the_formula():
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    c = 0.00054 * math.sqrt(32)
    d = distance(x, y, "pseudo_huber")  # c from d = 32 dimensions
    (grad,) = torch.autograd.grad(d.sum(), x)
    norm2 = (x - y).detach().square().flatten(1).sum(1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(grad, (x - y).detach() / (norm2 + c * c).sqrt(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(d, (norm2.flatten() + c * c).sqrt() - c)
    assert torch.equal(pseudo_huber(x, y, 0.0), (x - y).flatten(1).norm(dim=1))  # c = 0: the L2 norm (ECT)
    assert torch.equal(distance(x, y, "l2"), (x - y).square().flatten(1).sum(1))


def test_ect_mapping_halves_the_gap_every_stage():
    t = torch.tensor([0.01, 0.5, 2.0, 20.0, 80.0], dtype=torch.float64)
    for stage in range(4):
        r = ect_r(t, stage, q=2.0, k=8.0, b=1.0)
        expected = (t * (1 - 2.0 ** -(stage + 1) * (1 + 8 * torch.sigmoid(-t)))).clamp(min=0)
        torch.testing.assert_close(r, expected)
        assert bool((r < t).all()) and bool((r >= 0).all())
    # where sigmoid(-t) ~ 0 the gap t - r is t / 2^(stage+1): it halves from one stage to the next
    gaps = [float(80.0 - ect_r(t, s)[-1]) for s in range(4)]
    for a, b in zip(gaps[:-1], gaps[1:], strict=True):
        assert b == pytest.approx(a / 2, rel=1e-9)
    assert float(ect_r(t, 0)[0]) == 0.0  # stage 0 at small t: r = 0, the target is the data


def test_shared_dropout_makes_student_and_target_agree_on_the_same_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 4)).train()
    f = EDMPrecond(lambda x, c, y: net(x), sigma_min=SIGMA_MIN, boundary_condition=True)
    x = torch.randn(8, 4)
    sigma = torch.full((8,), 1.0)
    same = consistency_loss(f, f, x, sigma, x, sigma, x, kind="l2", shared_dropout=True)
    different = consistency_loss(f, f, x, sigma, x, sigma, x, kind="l2", shared_dropout=False)
    assert torch.equal(same, torch.zeros(8)) and bool((different > 0).all())
    # below sigma_min (ECT's r = 0) the target is the data itself
    net.eval()
    x0 = torch.randn(8, 4)
    d = consistency_loss(f, f, x, sigma, x, torch.zeros(8), x0, kind="l2")
    torch.testing.assert_close(d, (f(x, 1.0) - x0).square().sum(1))


def test_the_consistency_grid_takes_its_intermediate_sigmas_from_the_model():
    f = ConsistencyFunction(EDMPrecond(lambda x, c, y: x), SIGMA_MIN, SIGMA_MAX, mid_sigmas=[0.821])
    assert f.default_sigmas(1).tolist() == [80.0, 0.0] and f.default_sigmas(None).tolist() == [80.0, 0.0]
    assert f.default_sigmas(2).tolist() == [80.0, 0.821, 0.0]
    with pytest.raises(ValueError, match="model.mid_sigmas"):
        f.default_sigmas(3)
    out = sample(f, torch.randn(5, 2), "consistency", steps=2, clip_denoised=False)
    assert out.nfe == 2 and out.sigmas.tolist() == [80.0, 0.821, 0.0]


# ------------------------------------------------------------------------------- Gaussian data: the exact answer
