"""First stage of latent diffusion: the KL-regularised autoencoder and its PatchGAN discriminator.

Rombach et al. (2022) "High-Resolution Image Synthesis with Latent Diffusion Models" (LDM), Sec. 3.1 and App. G:
a convolutional encoder maps an image to a diagonal Gaussian posterior q(z|x) over an ``f``-times smaller latent,
a mirrored decoder maps z back; training adds a small KL(q(z|x) || N(0, I)) penalty, a perceptual (LPIPS) loss and
a patch-based adversarial loss (Esser et al. (2021) "Taming Transformers", VQGAN, Eq. 7). The architecture follows
the CompVis ``latent-diffusion`` / ``taming-transformers`` reference (``ldm/modules/diffusionmodules/model.py``,
``taming/modules/discriminator/model.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import Upsample  # nearest-neighbour x2 then a 3x3 conv, as the reference's (same parameter names)

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) from ``parameters`` = concat(mean, logvar) on dim 1.

    As in the reference, logvar is clamped to [-30, 20] so that exp(logvar) neither underflows nor overflows.
    """

    def __init__(self, parameters: Tensor) -> None:
        if parameters.ndim < 2 or parameters.shape[1] % 2:
            raise ValueError(f"expected (B, 2*z, ...) parameters (mean, logvar), got {tuple(parameters.shape)}")
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def _dims(self) -> list[int]:
        return list(range(1, self.mean.ndim))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised draw z = mean + std * eps, eps ~ N(0, I) (drawn on the generator's device if given)."""
        if generator is None:
            eps = torch.randn_like(self.mean)
        else:
            eps = torch.randn(self.mean.shape, generator=generator, device=generator.device, dtype=self.mean.dtype)
            eps = eps.to(self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The posterior's mode (= its mean)."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(N(mean, var) || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar) over the non-batch dims: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=self._dims())

    def nll(self, x: Tensor) -> Tensor:
        """-log N(x; mean, var) = 0.5 * sum(log 2pi + logvar + (x - mean)^2 / var) over the non-batch dims: (B,)."""
        return 0.5 * (math.log(2.0 * math.pi) + self.logvar + (x - self.mean).pow(2) / self.var).sum(dim=self._dims())


def _norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """The reference's GroupNorm (eps 1e-6, affine)."""
    return nn.GroupNorm(num_groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, GroupNorm-SiLU-Dropout-conv3x3, plus a 1x1 skip when the width changes (no time
    embedding)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, num_groups: int = 32) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q, k, v and output projection, residual."""

    def __init__(self, channels: int, num_groups: int = 32) -> None:
        super().__init__()
        self.norm = _norm(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v: (B, 1, HW, C)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve the resolution: pad (0, 1, 0, 1) then a stride-2 3x3 conv without padding, as the reference."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class MidBlock(nn.Module):
    """ResnetBlock - optional self-attention - ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, attention: bool, dropout: float, num_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, num_groups)
        self.attn_1 = AttnBlock(channels, num_groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, num_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> (B, 2*z_channels, H/f, W/f) (mean and logvar; z_channels with
    ``double_z=False``), f = 2^(len(ch_mult) - 1)."""

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        z_channels: int = 4,
        attention: bool = True,
        dropout: float = 0.0,
        num_groups: int = 32,
        double_z: bool = True,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(width, ch * mult, dropout, num_groups))
                width = ch * mult
            stage.block = nn.ModuleList(blocks)
            stage.downsample = Downsample(width) if level != len(ch_mult) - 1 else nn.Identity()
            self.down.append(stage)
        self.mid = MidBlock(width, attention, dropout, num_groups)
        self.norm_out = _norm(width, num_groups)
        self.conv_out = nn.Conv2d(width, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_channels, f*h, f*w), mirroring :class:`Encoder` (with
    num_res_blocks + 1 ResnetBlocks per level)."""

    def __init__(
        self,
        out_channels: int = 3,
        ch: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        z_channels: int = 4,
        attention: bool = True,
        dropout: float = 0.0,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = MidBlock(width, attention, dropout, num_groups)
        up = []  # built from the lowest resolution up, stored in level order as the reference (self.up[level])
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(width, ch * ch_mult[level], dropout, num_groups))
                width = ch * ch_mult[level]
            stage.block = nn.ModuleList(blocks)
            stage.upsample = Upsample(width) if level != 0 else nn.Identity()
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(width, num_groups)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """LDM's KL-regularised autoencoder (Rombach et al. 2022, Sec. 3.1): ``encode`` gives q(z|x) on a
    (z_channels, image_size/f, image_size/f) latent, f = 2^(len(ch_mult) - 1); ``decode`` maps z back to an image.

    The 1x1 ``quant_conv`` (2z -> 2z) and ``post_quant_conv`` (z -> z) of the reference sit between the encoder /
    decoder and the latent (its ``embed_dim`` is ``z_channels`` here).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        ch: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        z_channels: int = 4,
        attention: bool = True,
        dropout: float = 0.0,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        if not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty list of positive multipliers, got {list(ch_mult)}")
        if num_res_blocks < 0 or ch < 1 or z_channels < 1 or in_channels < 1:
            raise ValueError("ch, z_channels and in_channels must be positive and num_res_blocks non-negative")
        f = 2 ** (len(ch_mult) - 1)
        if image_size < 1 or image_size % f:
            raise ValueError(
                f"image_size={image_size} is not divisible by the downsampling factor f=2^(len(ch_mult)-1)={f} "
                f"(ch_mult={list(ch_mult)}): use fewer ch_mult levels or an image size that is a multiple of {f}"
            )
        bad = sorted({w for w in (ch, *(ch * m for m in ch_mult)) if w % num_groups})
        if bad:
            raise ValueError(
                f"GroupNorm needs every width divisible by num_groups={num_groups}, but widths {bad} (ch={ch} times "
                f"ch_mult={list(ch_mult)}) are not: change ch or num_groups"
            )
        self.image_size = image_size
        self.in_channels = in_channels
        self.z_channels = z_channels
        self.ch_mult = ch_mult
        args = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                    attention=attention, dropout=dropout, num_groups=num_groups)  # fmt: skip
        self.encoder = Encoder(in_channels, double_z=True, **args)
        self.decoder = Decoder(in_channels, **args)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    @property
    def downsampling_factor(self) -> int:
        """f = 2^(len(ch_mult) - 1): the latent is f times smaller than the image on each side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(z_channels, image_size / f, image_size / f)."""
        side = self.image_size // self.downsampling_factor
        return (self.z_channels, side, side)

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's final conv weight, where the adaptive GAN weight (VQGAN Eq. 7) takes its gradients."""
        return self.decoder.conv_out.weight

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Image (B, in_channels, image_size, image_size) in [-1, 1] -> the posterior q(z|x)."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"the autoencoder expects (B, {', '.join(map(str, expected))}) images, got {tuple(x.shape)}: "
                "model.first_stage's in_channels / image_size must match the data (data.image_size)"
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, *latent_shape) -> image (B, in_channels, image_size, image_size)."""
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected (B, {', '.join(map(str, self.latent_shape))}) latents, got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """(reconstruction, posterior): decodes a posterior sample (its mode with ``sample_posterior=False``)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


def _conv_out_size(size: int, stride: int) -> int:
    """Spatial size after a 4x4 conv with padding 1."""
    return (size + 2 - 4) // stride + 1


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (Isola et al. 2017), the reference's ``NLayerDiscriminator``: one logit per
    overlapping image patch (70x70 receptive field with n_layers=3)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.n_layers = n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):  # n_layers - 1 stride-2 blocks, then one stride-1 block
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """pix2pix init: conv weights N(0, 0.02); BatchNorm weights N(1, 0.02), biases 0."""
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def output_size(self, size: int) -> int:
        """Side of the logit map for a ``size`` x ``size`` input (<= 0: the input is too small)."""
        for stride in [2] * self.n_layers + [1, 1]:
            if size < 2:
                return 0
            size = _conv_out_size(size, stride)
        return size

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> patch logits (B, 1, h, w)."""
        if min(self.output_size(x.shape[-2]), self.output_size(x.shape[-1])) < 1:
            raise ValueError(
                f"{tuple(x.shape[-2:])} images are too small for a PatchDiscriminator with n_layers={self.n_layers}: "
                "lower n_layers"
            )
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))]) (VQGAN / LDM reference)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021, Eq. 7): lambda = ||grad_L rec_loss|| / (||grad_L g_loss|| + 1e-4)
    at the decoder's last layer L, clamped to [0, max_weight] and detached (a constant for the generator step).

    Both losses must still have their graphs through ``last_layer``; they are retained for the later backward.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(rec_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
