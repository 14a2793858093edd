"""Tests for the DDPM/ADM U-Net."""

from __future__ import annotations

import warnings

import pytest
import torch

from diffusion_lightning.diffusion.conditioning import Condition, null_condition
from diffusion_lightning.nets import UNet
from diffusion_lightning.nets.unet import CrossAttentionBlock, ResBlock, zero_module

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
    left a 32-channel Fashion-MNIST model's learned variance flat in t; docs/results/improved_ddpm.md)."""
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


# Conditions beyond a label: context tokens (cross-attention) and a concatenated image.
XT = dict(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
          attention_resolutions=(4,), num_groups=4)


def cross_blocks(model: torch.nn.Module) -> list[CrossAttentionBlock]:
    return [m for m in model.modules() if isinstance(m, CrossAttentionBlock)]


def perturb_except_cross_proj_(model: torch.nn.Module) -> torch.nn.Module:
    """``perturb_`` on every parameter but the cross-attention output projections (left at their zero init): first
    those of the plain U-Net, drawing the same noise as ``perturb_`` does on it, then the cross-attention's."""
    cross = [p for b in cross_blocks(model) for p in b.parameters()]
    proj = {id(p) for b in cross_blocks(model) for p in b.proj_out.parameters()}
    torch.manual_seed(1)
    with torch.no_grad():
        for p in [p for p in model.parameters() if all(p is not q for q in cross)] + cross:
            if id(p) not in proj:
                p.add_(0.1 * torch.randn_like(p))
    return model


def perturb_cross_proj_(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(2)
    with torch.no_grad():
        for b in cross_blocks(model):
            for p in b.proj_out.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_new_options_off_by_default() -> None:
    """The defaults build the same network: same keys, the same seeded init, the same outputs; a bare label tensor
    and ``Condition(label=...)`` are one condition."""
    torch.manual_seed(0)
    default = UNet(**XT, num_classes=3)
    torch.manual_seed(0)
    explicit = UNet(**XT, num_classes=3, context_dim=None, cond_channels=0)
    a, b = default.state_dict(), explicit.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not cross_blocks(default) and default.input_conv.in_channels == 1
    model = perturb_(default).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 70]), torch.tensor([0, 3])
    assert torch.equal(model(x, t, y), model(x, t, Condition(label=y)))
    with pytest.raises(ValueError, match="num_classes"):
        model(x, t, Condition())


def test_cross_attention_is_the_identity_at_init() -> None:
    """Every cross-attention block comes after all other modules, so they draw the init of the plain U-Net, and its
    zero-initialised output projection makes the block the identity: the context changes nothing until it is
    trained."""
    torch.manual_seed(0)
    plain = UNet(**XT, num_heads=2)
    torch.manual_seed(0)
    model = UNet(**XT, num_heads=2, context_dim=6)
    assert len(cross_blocks(model)) == 4  # after each self-attention: 1 down and 2 up at the 4x4 level, the middle
    theirs = [p for p in model.parameters() if all(p is not q for b in cross_blocks(model) for q in b.parameters())]
    assert len(theirs) == len(list(plain.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), theirs, strict=True))
    perturb_(plain).eval()
    perturb_except_cross_proj_(model).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    ctx = torch.randn(2, 5, 6)
    out = model(x, t, Condition(context=ctx))
    torch.testing.assert_close(out, plain(x, t))
    assert torch.equal(out, model(x, t, Condition(context=torch.zeros_like(ctx))))
    perturb_cross_proj_(model)
    out = model(x, t, Condition(context=ctx))
    assert (out - model(x, t, Condition(context=torch.zeros_like(ctx)))).abs().max() > 1e-3
    assert (out - plain(x, t)).abs().max() > 1e-3


def test_context_mask() -> None:
    """Masked-out tokens (False) do not reach the output; an all-False row attends to nothing (the block adds zero,
    not NaN), as does an empty context; no mask is an all-True one, which the null context has."""
    torch.manual_seed(0)
    model = perturb_(UNet(**XT, num_heads=2, context_dim=6)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    ctx = torch.randn(2, 4, 6)
    mask = torch.tensor([[True, False, True, False], [True, True, True, False]])
    out = model(x, t, Condition(context=ctx, context_mask=mask))
    masked, unmasked = ctx.clone(), ctx.clone()
    masked[0, 1] += 5.0
    masked[1, 3] += 5.0
    unmasked[0, 2] += 5.0
    torch.testing.assert_close(model(x, t, Condition(context=masked, context_mask=mask)), out, rtol=1e-6, atol=1e-6)
    changed = model(x, t, Condition(context=unmasked, context_mask=mask))
    assert (changed[0] - out[0]).abs().max() > 1e-3
    torch.testing.assert_close(changed[1], out[1])

    no_mask = model(x, t, Condition(context=ctx))
    torch.testing.assert_close(model(x, t, Condition(context=ctx, context_mask=torch.ones_like(mask))), no_mask)
    assert null_condition(Condition(context=ctx, context_mask=mask), None).context_mask.all()

    zero_add = UNet(**XT, num_heads=2, context_dim=6)
    zero_add.load_state_dict(model.state_dict())
    for b in cross_blocks(zero_add):
        zero_module(b.proj_out)
    ref = zero_add.eval()(x, t, Condition(context=ctx))
    empty = mask.clone()
    empty[0] = False
    out = model(x, t, Condition(context=ctx, context_mask=empty))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], model(x, t, Condition(context=ctx, context_mask=mask))[1])
    assert (out[1] - ref[1]).abs().max() > 1e-3
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(model(x, t, Condition(context=ctx[:, :0])), ref)


def test_one_token_cross_attention_adds_a_constant() -> None:
    """The softmax over one key is 1, so the block adds proj_out(v(token)) at every position, one vector per sample."""
    torch.manual_seed(0)
    block = perturb_(CrossAttentionBlock(16, context_dim=6, num_heads=2, num_groups=4))
    x, token = torch.randn(2, 16, 4, 4), torch.randn(2, 1, 6)
    W, b = block.proj_out.weight[:, :, 0, 0], block.proj_out.bias
    added = block.v(token[:, 0]) @ W.T + b  # (2, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(x, token), x + added[:, :, None, None])
    assert (added[0] - added[1]).abs().max() > 1e-3


def test_concatenated_image() -> None:
    torch.manual_seed(0)
    model = perturb_(UNet(**XT, cond_channels=2)).eval()
    assert model.in_channels == 1 and model.out_channels == 1 and model.input_conv.in_channels == 3
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    im = torch.randn(2, 2, 8, 8)
    out = model(x, t, Condition(image=im))
    assert out.shape == x.shape
    assert (out - model(x, t, Condition(image=im + 1.0))).abs().max() > 1e-3
    for bad in (None, Condition(image=torch.randn(2, 3, 8, 8)), Condition(image=torch.randn(2, 2, 4, 4)),
                Condition()):
        with pytest.raises(ValueError, match=r"model\.net\.cond_channels"):
            model(x, t, bad)
    with pytest.raises(ValueError, match=r"model\.net\.cond_channels"):
        UNet(**XT)(x, t, Condition(image=im))


def test_context_errors() -> None:
    model = UNet(**XT, context_dim=6)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    for bad in (None, Condition(), Condition(context=torch.randn(2, 4, 5)), Condition(context=torch.randn(2, 6))):
        with pytest.raises(ValueError, match=r"model\.net\.context_dim"):
            model(x, t, bad)
    with pytest.raises(ValueError, match="context_mask must be bool"):
        model(x, t, Condition(context=torch.randn(2, 4, 6), context_mask=torch.ones(2, 4)))
    with pytest.raises(ValueError, match=r"model\.net\.context_dim"):
        UNet(**XT)(x, t, Condition(context=torch.randn(2, 4, 6)))
    with pytest.raises(ValueError, match=r"model\.net\.context_dim=0"):
        UNet(**XT, context_dim=0)


def test_conditions_with_channels_last_and_bf16() -> None:
    torch.manual_seed(0)
    model = perturb_(UNet(**XT, num_heads=2, num_classes=3, context_dim=6, cond_channels=2)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    cond = Condition(label=torch.tensor([0, 3]), context=torch.randn(2, 4, 6),
                     context_mask=torch.tensor([[True, True, False, False], [True] * 4]), image=torch.randn(2, 2, 8, 8))
    ref = model(x, t, cond)
    out = model(x, t, cond)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, cond)
    torch.testing.assert_close(cl, ref, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, cond.map(lambda v: v.bfloat16() if v.is_floating_point() else v))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1
    out = model.bfloat16()(x.bfloat16(), t, cond)  # float32 context and image into a bf16 network
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1
