"""ADM/DDPM-style U-Net denoiser.

With the defaults this is the CIFAR-10 network of Ho et al. (2020) "DDPM" (35.7M parameters; reference
``diffusion_tf/models/unet.py``). The options of Dhariwal & Nichol (2021) "ADM" add multi-head attention,
class conditioning, FiLM-style ``use_scale_shift_norm`` and residual up/down-sampling blocks. Beyond a label, the
network takes a :class:`~diffusion_lightning.diffusion.conditioning.Condition`: context tokens through cross-attention
(Rombach et al. 2022 "LDM", Sec. 3.3) and an image concatenated to its input.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diffusion.conditioning import Condition


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """DDPM sinusoidal embedding [sin, cos] of (B,) timesteps, computed in float32: (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (DDPM's ``init_scale=0.``) so residual branches start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, + time embedding, GroupNorm-SiLU-Dropout-conv3x3, plus a (1x1) skip.

    ``use_scale_shift_norm`` applies the embedding as ``norm(h) * (1 + scale) + shift`` (ADM) instead of an
    additive bias (DDPM). ``up``/``down`` resample inside the block (ADM's ``resblock_updown``).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, num_groups: int,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = nn.GroupNorm(num_groups, in_ch)
        self.in_conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.resample = up or down
        self.h_upd = self.x_upd = nn.Identity()
        if up:
            self.h_upd = self.x_upd = nn.Upsample(scale_factor=2.0, mode="nearest")
        elif down:
            self.h_upd = self.x_upd = nn.AvgPool2d(2)
        self.emb_proj = nn.Linear(emb_ch, 2 * out_ch if use_scale_shift_norm else out_ch)
        self.out_norm = nn.GroupNorm(num_groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.in_norm(x))
        if self.resample:
            h, x = self.h_upd(h), self.x_upd(x)
        h = self.in_conv(h)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions: GroupNorm, qkv 1x1, attention, proj 1x1, residual."""

    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, head_dim)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))


class CrossAttentionBlock(nn.Module):
    """Multi-head cross-attention from every position of x to context tokens (LDM, Sec. 3.3: Q = W_Q phi(z),
    K = W_K tau(y), V = W_V tau(y)): GroupNorm, q 1x1 conv, k and v linear maps of the tokens (no bias: a key bias
    shifts every logit alike, a value bias is a constant that ``proj_out``'s bias already is), attention,
    zero-initialised proj 1x1 (the identity at init), residual.

    ``mask`` (B, L) bool marks the tokens to attend (True). A row with no True would be a softmax over nothing (NaN);
    such a sample, and an empty context (L = 0), attends to nothing: the block adds zero. The null context of
    classifier-free guidance (``conditioning.null_condition``) is zero tokens with an all-True mask, not this.
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Linear(context_dim, channels, bias=False)
        self.v = nn.Linear(context_dim, channels, bias=False)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        if context.shape[1] == 0:
            return x
        n, d = self.num_heads, C // self.num_heads
        q = self.q(self.norm(x)).reshape(B, n, d, H * W).transpose(-1, -2)  # (B, heads, HW, d)
        context = context.to(self.k.weight.dtype)
        k, v = (f(context).reshape(B, -1, n, d).transpose(1, 2) for f in (self.k, self.v))  # (B, heads, L, d)
        keep = attn_mask = None
        if mask is not None:
            keep = mask.any(dim=1)  # (B,): samples with a token to attend
            attn_mask = (mask | ~keep[:, None])[:, None, None, :]  # an empty row attends all (finite), zeroed below
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))
        return x + (out if keep is None else out * keep[:, None, None, None])


class UNet(nn.Module):
    """Noise-prediction U-Net of DDPM (Ho et al., 2020) with the ADM (Dhariwal & Nichol, 2021) options.

    Args:
        image_size: input height/width; must be divisible by 2 ** (len(channel_mult) - 1).
        in_channels: image channels.
        out_channels: output channels; defaults to ``in_channels`` (learned variance: ``2 * in_channels``).
        model_channels: base width ``ch``; the time embedding has ``4 * ch`` channels.
        channel_mult: width multiplier per resolution level.
        num_res_blocks: ResBlocks per level on the down path (the up path has one more).
        attention_resolutions: feature-map sizes in pixels (16 = the 16x16 level) that get self-attention.
        dropout: dropout rate inside ResBlocks.
        num_heads: attention heads (ignored when ``num_head_channels > 0``).
        num_head_channels: channels per attention head; if > 0 it overrides ``num_heads``.
        num_classes: if set, a learned class embedding is added to the time embedding and ``y`` is required; label
            ``num_classes`` is the null class ("no label") of classifier-free guidance (Ho & Salimans 2022).
        use_scale_shift_norm: ADM's FiLM conditioning instead of DDPM's additive time bias.
        resblock_updown: resample with ResBlocks (ADM) instead of plain (strided/upsampling) convs.
        num_groups: GroupNorm groups; every level's width must be divisible by it, and with the additive
            embedding hold at least 2 channels per group (a one-channel group erases the embedding).
        context_dim: if set, the width D of context tokens (B, L, D): every self-attention block (at
            ``attention_resolutions`` and in the middle) is followed by a :class:`CrossAttentionBlock` to them, and
            ``y`` must be a ``Condition`` with ``context`` (and optionally ``context_mask``).
        cond_channels: channels of an image concatenated to x before the first conv (``Condition.image``, same H, W);
            ``in_channels`` stays the channels of x.

    ``forward(x, t, y)``: ``y`` is None, (B,) class labels or a :class:`Condition`. The new modules of the last two
    options are created after all others, so the remaining weights draw the same random numbers as without them
    (``cond_channels > 0`` widens ``input_conv`` and so changes its draw and every later one).
    """

    def __init__(self, image_size: int = 32, in_channels: int = 3, out_channels: int | None = None,
                 model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), dropout: float = 0.1, num_heads: int = 1,
                 num_head_channels: int = -1, num_classes: int | None = None, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, num_groups: int = 32, context_dim: int | None = None,
                 cond_channels: int = 0) -> None:
        super().__init__()
        if context_dim is not None and context_dim < 1:
            raise ValueError(f"model.net.context_dim={context_dim} must be a positive token width, or null (none)")
        if cond_channels < 0:
            raise ValueError(f"model.net.cond_channels={cond_channels} must be >= 0")
        levels = len(channel_mult)
        factor = 2 ** (levels - 1)
        if levels == 0 or image_size % factor:
            below, above = image_size // max(factor, 1) * factor, (image_size // max(factor, 1) + 1) * factor
            near = " or ".join(str(v) for v in (below, above) if v > 0)
            raise ValueError(
                f"image_size={image_size} must be divisible by 2**(len(channel_mult)-1)={factor} for "
                f"channel_mult={tuple(channel_mult)}: the nearest sizes that work are {near} (data.image_size=...), "
                "or use fewer levels in channel_mult"
            )
        resolutions = [image_size // 2**i for i in range(levels)]
        if bad := sorted(set(attention_resolutions) - set(resolutions)):
            raise ValueError(
                f"attention_resolutions {bad} do not occur in this U-Net; its levels have resolutions {resolutions} "
                f"(image_size={image_size}, channel_mult={tuple(channel_mult)})"
            )
        if bad_w := [model_channels * m for m in channel_mult if (model_channels * m) % num_groups]:
            raise ValueError(
                f"level widths {bad_w} (model_channels * channel_mult) are not divisible by num_groups={num_groups}: "
                f"change model_channels or num_groups"
            )
        if not use_scale_shift_norm and (narrow := [model_channels * m for m in channel_mult
                                                     if model_channels * m == num_groups]):
            # The additive embedding is one constant per channel, and a one-channel group subtracts each channel's
            # mean: the ResBlock's out_norm(h + emb) erases the time (and class) embedding at those levels. A warning,
            # not an error, so that checkpoints trained so still load.
            warnings.warn(
                f"num_groups={num_groups} puts one channel per GroupNorm group at level widths {narrow}, which "
                f"erases the additive time embedding there: use num_groups={max(1, num_groups // 4)} (or any value "
                f"with at least 2 channels per group), or use_scale_shift_norm=true",
                stacklevel=2,
            )
        self.image_size, self.in_channels = image_size, in_channels
        self.out_channels = out_channels or in_channels
        self.model_channels, self.num_classes = model_channels, num_classes
        self.context_dim, self.cond_channels = context_dim, cond_channels
        ch, emb_ch = model_channels, 4 * model_channels

        def heads(c: int) -> int:
            n = c // num_head_channels if num_head_channels > 0 else num_heads
            if n < 1 or c % n:
                raise ValueError(f"attention width {c} is not divisible into heads (num_heads={num_heads}, "
                                 f"num_head_channels={num_head_channels}): pick a divisor of {c}")
            return n

        def res(c_in: int, c_out: int, **kw: bool) -> ResBlock:
            return ResBlock(c_in, c_out, emb_ch, dropout, num_groups, use_scale_shift_norm, **kw)

        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_emb = nn.Embedding(num_classes + 1, emb_ch) if num_classes is not None else None
        self.input_conv = nn.Conv2d(in_channels + cond_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs, c = [ch], ch
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(c, ch * mult)]
                c = ch * mult
                if resolutions[level] in attention_resolutions:
                    layers.append(AttentionBlock(c, heads(c), num_groups))
                self.down.append(nn.ModuleList(layers))
                skip_chs.append(c)
            if level != levels - 1:
                self.down.append(nn.ModuleList([res(c, c, down=True) if resblock_updown else Downsample(c)]))
                skip_chs.append(c)

        self.middle = nn.ModuleList([res(c, c), AttentionBlock(c, heads(c), num_groups), res(c, c)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(c + skip_chs.pop(), ch * mult)]
                c = ch * mult
                if resolutions[level] in attention_resolutions:
                    layers.append(AttentionBlock(c, heads(c), num_groups))
                if level != 0 and i == num_res_blocks:
                    layers.append(res(c, c, up=True) if resblock_updown else Upsample(c))
                self.up.append(nn.ModuleList(layers))

        self.out = nn.Sequential(nn.GroupNorm(num_groups, c), nn.SiLU(),
                                 zero_module(nn.Conv2d(c, self.out_channels, 3, padding=1)))

        if context_dim is not None:  # last, so that every module above draws the same init as without context
            for layers in (*self.down, self.middle, *self.up):
                for i in reversed([i for i, m in enumerate(layers) if isinstance(m, AttentionBlock)]):
                    attn = layers[i]
                    layers.insert(i + 1, CrossAttentionBlock(attn.norm.num_channels, context_dim, attn.num_heads,
                                                             num_groups))

    @staticmethod
    def _run(layers: nn.ModuleList, h: Tensor, emb: Tensor, context: Tensor | None = None,
             mask: Tensor | None = None) -> Tensor:
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, CrossAttentionBlock):
                h = layer(h, context, mask)
            else:
                h = layer(h)
        return h

    def _unpack(self, x: Tensor, y: Tensor | Condition | None) -> tuple[Tensor | None, Tensor | None, Tensor | None,
                                                                         Tensor | None]:
        """Labels, context, context mask and image of ``y``, checked against the network's options."""
        label, context, mask, image = (y.label, y.context, y.context_mask, y.image) if isinstance(y, Condition) else (
            y, None, None, None)
        if (label is None) != (self.label_emb is None):
            raise ValueError("class labels y are required iff model.net.num_classes is set "
                             f"(num_classes={self.num_classes}, y {'missing' if label is None else 'given'})")
        B = x.shape[0]
        if (context is None) != (self.context_dim is None):
            raise ValueError("a Condition with context tokens is required iff model.net.context_dim is set "
                             f"(context_dim={self.context_dim}, context {'missing' if context is None else 'given'})")
        if context is not None and (context.ndim != 3 or context.shape[0] != B or context.shape[2] != self.context_dim):
            raise ValueError(f"the context must have shape (B={B}, L, model.net.context_dim={self.context_dim}) but "
                             f"has {tuple(context.shape)}: make model.net.context_dim the token width")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != context.shape[:2]):
            raise ValueError(f"the context_mask must be bool of shape {tuple(context.shape[:2])} (True = attend) but "
                             f"is {mask.dtype} {tuple(mask.shape)}")
        if (image is None) != (self.cond_channels == 0):
            raise ValueError("a Condition with an image is required iff model.net.cond_channels > 0 "
                             f"(cond_channels={self.cond_channels}, image {'missing' if image is None else 'given'})")
        if image is not None and (image.ndim != 4 or image.shape[0] != B or image.shape[1] != self.cond_channels
                                  or image.shape[-2:] != x.shape[-2:]):
            raise ValueError(f"the conditioning image must have shape (B={B}, model.net.cond_channels="
                             f"{self.cond_channels}, {x.shape[-2]}, {x.shape[-1]}) but has {tuple(image.shape)}")
        return label, context, mask, image

    def forward(self, x: Tensor, t: Tensor, y: Tensor | Condition | None = None) -> Tensor:
        """Predict from noisy images x (B, C, H, W) at timesteps t (B,); y: (B,) class labels if class-conditional,
        or a :class:`Condition` (labels, context tokens, image; see the class docstring)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"UNet expects inputs of shape (B, {self.in_channels}, {self.image_size}, {self.image_size}) but got "
                f"{tuple(x.shape)}: make model.net.image_size match data.image_size and model.net.in_channels "
                f"match the dataset's channels"
            )
        y, context, mask, image = self._unpack(x, y)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)

        hs = [self.input_conv(x if image is None else torch.cat([x, image.to(x.dtype)], dim=1))]
        for layers in self.down:
            hs.append(self._run(layers, hs[-1], emb, context, mask))
        h = self._run(self.middle, hs[-1], emb, context, mask)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, hs.pop()], dim=1), emb, context, mask)
        return self.out(h)
