"""Tests for the DDPM/ADM U-Net."""

from __future__ import annotations

import warnings

import pytest
import torch

from diffusion_lightning.nets import UNet
from diffusion_lightning.nets.unet import ResBlock

TINY = dict(image_size=16, in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(8,), num_groups=8)


def perturb_(model: torch.nn.Module) -> torch.nn.Module:
    """Add noise to every parameter so the zero-initialised residual branches and output conv are live."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_paper_config_param_count() -> None:
    model = UNet(image_size=32, in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attention_resolutions=(16,), dropout=0.1)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e5) / 10 == 35.7, n


@pytest.mark.parametrize("out_channels", [None, 2])
def test_output_shape(out_channels: int | None) -> None:
    model = UNet(**TINY, out_channels=out_channels)
    out = model(torch.randn(3, 1, 16, 16), torch.tensor([0, 10, 999]))
    assert out.shape == (3, out_channels or 1, 16, 16)
    assert torch.all(out == 0)  # zero-initialised output conv


@pytest.mark.parametrize("kw", [dict(use_scale_shift_norm=True, resblock_updown=True, num_head_channels=8),
                                dict(num_heads=2, channel_mult=(1, 2, 2), attention_resolutions=(8, 4))])
def test_adm_options(kw: dict) -> None:
    model = perturb_(UNet(**{**TINY, **kw}).eval())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_timestep_changes_output() -> None:
    model = perturb_(UNet(**TINY)).eval()
    x = torch.randn(2, 1, 16, 16)
    assert not torch.allclose(model(x, torch.tensor([1, 1])), model(x, torch.tensor([500, 500])))


def test_class_conditional() -> None:
    model = perturb_(UNet(**TINY, num_classes=10)).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 5])
    assert not torch.allclose(model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([3, 3])))
    with pytest.raises(ValueError, match="num_classes"):
        model(x, t)
    with pytest.raises(ValueError, match="num_classes"):
        perturb_(UNet(**TINY))(x, t, torch.tensor([0, 1]))


def test_dropout_off_in_eval() -> None:
    model = perturb_(UNet(**TINY, dropout=0.5))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 50])
    model.train()
    assert not torch.allclose(model(x, t), model(x, t))
    model.eval()
    assert torch.equal(model(x, t), model(x, t))


def test_channels_last_and_bf16_autocast() -> None:
    model = perturb_(UNet(**TINY)).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 50])
    ref = model(x, t)
    cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(cl, ref, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1


def test_bad_image_size_in_constructor() -> None:
    with pytest.raises(ValueError, match=r"divisible by 2\*\*\(len\(channel_mult\)-1\)=8.*fewer levels"):
        UNet(image_size=28, channel_mult=(1, 2, 2, 2), attention_resolutions=())


def test_bad_attention_resolution() -> None:
    with pytest.raises(ValueError, match=r"attention_resolutions \[16\].*resolutions \[28, 14\]"):
        UNet(image_size=28, channel_mult=(1, 2), attention_resolutions=(16,))


def test_bad_num_groups() -> None:
    with pytest.raises(ValueError, match="num_groups=32"):
        UNet(model_channels=48, channel_mult=(1, 2), attention_resolutions=())


def test_one_channel_groups_would_erase_the_time_embedding() -> None:
    """Why the U-Net warns on one channel per GroupNorm group with the additive embedding: the ResBlock's
    out_norm(h + emb) then removes every channel's mean, emb included, so its output ignores t (this once
    left a 32-channel Fashion-MNIST model's learned variance flat in t; docs/results.md)."""
    torch.manual_seed(0)
    block = perturb_(ResBlock(8, 8, emb_ch=16, dropout=0.0, num_groups=8)).eval()
    x, e1, e2 = torch.randn(2, 8, 8, 8), torch.randn(2, 16), torch.randn(2, 16)
    torch.testing.assert_close(block(x, e1), block(x, e2))  # t is lost
    grouped = perturb_(ResBlock(8, 8, emb_ch=16, dropout=0.0, num_groups=4)).eval()
    assert (grouped(x, e1) - grouped(x, e2)).abs().max() > 1e-2  # two channels per group keep it
    with pytest.warns(UserWarning, match="erases the additive time embedding.*num_groups=8"):
        UNet(model_channels=32, channel_mult=(1, 2), num_groups=32, attention_resolutions=())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FiLM conditioning acts after the norm: no warning
        UNet(model_channels=32, channel_mult=(1, 2), num_groups=32, attention_resolutions=(), use_scale_shift_norm=True)


def test_bad_input_shape_in_forward() -> None:
    model = UNet(**TINY)
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\).*model\.net\.image_size.*data\.image_size"):
        model(torch.randn(2, 1, 32, 32), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"model\.net\.in_channels"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
