"""The diffusers side of the training-throughput benchmark: the same U-Net layout as ``diffusion_lightning.nets.UNet``
built as diffusers' ``UNet2DModel``, trained with the recipe of diffusers'
``examples/unconditional_image_generation/train_unconditional.py``.

diffusers is a dev dependency and is imported only inside the functions here.

Parameter counts (``python -m diffusion_lightning.bench_diffusers`` prints them) are identical, not just close:

* the default Fashion-MNIST model (image_size 32, 1 channel, ch 32, mult 1-2-2, 1 block, no attention but the
  middle one): 1,062,497 ours and diffusers';
* the DDPM CIFAR-10 layout (ch 128, mult 1-2-2-2, 2 blocks, attention at 16x16): 35,746,307 both, the 35.7M of Ho et al.
  (and of diffusers' ``google/ddpm-cifar10-32``, whose layout this is).

The layouts match block for block (a ResBlock is diffusers' ``ResnetBlock2D``, the attention block is one
``Attention`` with GroupNorm, biased q/k/v/out projections, and 1x1 convs and linear layers have equal parameter
counts). Numerical differences that do not change the count or the cost: the Downsample conv pads (1, 1) as ours does
(``downsample_padding=1``; the converted DDPM checkpoint uses 0, i.e. TF's asymmetric "SAME" padding) and GroupNorm's
eps is PyTorch's 1e-5 as ours (the converted checkpoint uses 1e-6).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import UNet2DModel

_INSTALL_HINT = "pip install diffusers (or make install, which installs the dev extras)"

# Keys of diffusion_lightning.nets.UNet (plus Hydra's _target_) that diffusers_unet understands.
_KNOWN_KEYS = {
    "_target_", "image_size", "in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
    "attention_resolutions", "dropout", "num_heads", "num_head_channels", "num_classes", "use_scale_shift_norm",
    "resblock_updown", "num_groups",
}

# The two layouts whose parameter counts are checked (tests/test_bench_diffusers.py and ``__main__``).
FMNIST_DEFAULT_NET: dict[str, Any] = dict(  # conf/experiment/ddpm_fmnist.yaml
    image_size=28, in_channels=1, model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1,
    attention_resolutions=[], dropout=0.0, num_groups=8,
)
DDPM_CIFAR10_NET: dict[str, Any] = dict(  # conf/model/ddpm.yaml: Ho et al. (2020), 35.7M parameters
    image_size=32, in_channels=3, model_channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2,
    attention_resolutions=[16], dropout=0.1, num_groups=32,
)


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"the diffusers benchmark needs diffusers: {_INSTALL_HINT}") from e
    return diffusers


def _attention_head_dim(widths: set[int], num_heads: int, num_head_channels: int) -> int | None:
    """diffusers' single ``attention_head_dim`` (heads = width // head_dim) giving our head count at every width."""
    if num_head_channels > 0:
        if bad := sorted(w for w in widths if w % num_head_channels):
            raise ValueError(f"num_head_channels={num_head_channels} does not divide the attention widths {bad}")
        return num_head_channels
    if num_heads == 1:
        return None  # diffusers then uses each block's width as the head dim: one head everywhere
    if len(widths) != 1 or next(iter(widths)) % num_heads:
        raise ValueError(
            f"num_heads={num_heads} cannot be mapped to diffusers: its attention_head_dim fixes channels per head, so "
            f"a constant head count needs one attention width, but attention (incl. the middle block) runs at widths "
            f"{sorted(widths)}; use num_head_channels instead"
        )
    return next(iter(widths)) // num_heads


def diffusers_unet(net: Mapping[str, Any]) -> UNet2DModel:
    """diffusers' ``UNet2DModel`` with the layout of ``diffusion_lightning.nets.UNet(**net)``.

    ``net`` holds UNet's keyword arguments (a Hydra ``model.net`` node works; ``_target_`` is ignored). Options that
    diffusers cannot express raise ValueError naming them.
    """
    diffusers = _import_diffusers()
    if unknown := sorted(set(net) - _KNOWN_KEYS):
        raise ValueError(f"UNet option(s) {unknown} cannot be mapped to diffusers' UNet2DModel")
    image_size = int(net.get("image_size", 32))
    in_channels = int(net.get("in_channels", 3))
    out_channels = int(net.get("out_channels") or in_channels)
    ch = int(net.get("model_channels", 128))
    channel_mult = [int(m) for m in net.get("channel_mult", (1, 2, 2, 2))]
    attention_resolutions = {int(r) for r in net.get("attention_resolutions", (16,))}
    scale_shift = bool(net.get("use_scale_shift_norm", False))
    updown = bool(net.get("resblock_updown", False))
    levels = len(channel_mult)
    if levels == 0 or image_size % 2 ** (levels - 1):
        raise ValueError(f"image_size={image_size} is not divisible by 2**(len(channel_mult)-1)={2 ** (levels - 1)}")
    resolutions = [image_size // 2**i for i in range(levels)]
    if bad := sorted(attention_resolutions - set(resolutions)):
        raise ValueError(f"attention_resolutions {bad} do not occur in this U-Net (levels at {resolutions})")
    attn = [r in attention_resolutions for r in resolutions]
    widths = [ch * m for m in channel_mult]
    head_dim = _attention_head_dim(
        {w for w, a in zip(widths, attn, strict=True) if a} | {widths[-1]},
        int(net.get("num_heads", 1)), int(net.get("num_head_channels", -1)),
    )
    num_groups = int(net.get("num_groups", 32))
    # Plain blocks resample with a stride-2 conv / nearest+conv ("conv"); ADM's resblock_updown resamples inside a
    # ResBlock with avg-pool / nearest ("resnet"; for plain levels diffusers names these Resnet*sampleBlock2D).
    down_plain, up_plain = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown else ("DownBlock2D",
                                                                                                 "UpBlock2D")
    return diffusers.UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(widths),
        layers_per_block=int(net.get("num_res_blocks", 2)),
        down_block_types=tuple("AttnDownBlock2D" if a else down_plain for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else up_plain for a in reversed(attn)),
        downsample_type="resnet" if updown else "conv",
        upsample_type="resnet" if updown else "conv",
        downsample_padding=1,  # our Downsample: Conv2d(3, stride=2, padding=1)
        dropout=float(net.get("dropout", 0.1)),
        act_fn="silu",
        attention_head_dim=head_dim,
        norm_num_groups=num_groups,
        attn_norm_num_groups=num_groups,  # else the middle attention loses its GroupNorm with scale_shift
        norm_eps=1e-5,
        # Our timestep_embedding is [sin, cos] with frequencies exp(-log(1e4) * i / (half - 1)), as in DDPM and
        # diffusers' conversion of it (google/ddpm-cifar10-32: flip_sin_to_cos=False, freq_shift=1).
        time_embedding_type="positional",
        flip_sin_to_cos=False,
        freq_shift=1,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        add_attention=True,
        # nn.Embedding added to the time embedding, as ours (whose last row is the guidance null class)
        num_class_embeds=None if net.get("num_classes") is None else net["num_classes"] + 1,
    )


def diffusers_train_throughput(
    net: Mapping[str, Any], batch: int, steps: int, warmup: int, *, device: str = "cpu", lr: float = 2e-4,
    clip: float = 1.0, ema_decay: float = 0.9999, precision: str = "32", channels_last: bool = False,
    compile: bool = False, seed: int = 0, stats: dict[str, float] | None = None,
) -> float:
    """Images/s of diffusers' ``train_unconditional.py`` step on ``diffusers_unet(net)``.

    Per step: random timesteps, ``DDPMScheduler.add_noise``, eps MSE, backward, grad clipping, AdamW (the script's
    betas (0.95, 0.999), weight decay 1e-6, eps 1e-8), cosine LR schedule and ``EMAModel.step``. Data are random
    images in [-1, 1] made up front, so no data loading is timed. ``precision`` "bf16" runs forward and loss under
    ``torch.autocast`` with bf16 inputs, as accelerate and the script do. ``warmup`` untimed steps precede ``steps``
    timed ones. If ``stats`` is given it receives the last step's ``loss``, the timed ``seconds`` and ``params``.
    Raises FloatingPointError if the loss is not finite.
    """
    diffusers = _import_diffusers()
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from .bench import _sync

    if precision in ("32", "32-true"):
        dtype = torch.float32
    elif precision in ("bf16", "bf16-mixed"):
        dtype = torch.bfloat16
    else:
        raise ValueError(f"precision={precision!r}: use '32' or 'bf16'")
    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"need batch >= 1, steps >= 1 and warmup >= 0 (got {batch}, {steps}, {warmup})")
    dev = torch.device(device)
    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    model = diffusers_unet(net).to(dev, memory_format=fmt).train()
    cfg = model.config
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    # The script's defaults: 500 warm-up steps, cosine decay over the run.
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500,
                                 num_training_steps=max(warmup + steps, 501))
    ema = EMAModel(model.parameters(), decay=ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=type(model), model_config=cfg)
    ema.to(dev)
    forward = torch.compile(model) if compile else model

    # A few distinct batches, cycled: enough that nothing is cached across steps, small enough for any run length.
    shape = (min(warmup + steps, 4), batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    data = (torch.rand(shape, device=dev) * 2 - 1).to(dtype)
    labels = None
    if cfg.num_class_embeds is not None:
        labels = torch.randint(0, cfg.num_class_embeds, shape[:2], device=dev)

    def step(i: int) -> torch.Tensor:
        clean = data[i % len(data)].contiguous(memory_format=fmt)
        noise = torch.randn(clean.shape, dtype=dtype, device=dev).contiguous(memory_format=fmt)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=dev).long()
        noisy = scheduler.add_noise(clean, noise, t)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            kwargs = {} if labels is None else {"class_labels": labels[i % len(labels)]}
            out = forward(noisy, t, **kwargs).sample
            # A learned-variance layout (out_channels = 2C) costs the same; the eps recipe reads its first C channels.
            loss = F.mse_loss(out[:, : cfg.in_channels].float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        return loss.detach()

    for i in range(warmup):
        step(i)
    _sync(dev)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = step(i)
    _sync(dev)
    seconds = time.perf_counter() - start
    last = float(loss)
    if not math.isfinite(last):
        raise FloatingPointError(f"diffusers training loss is {last} after {warmup + steps} steps")
    if stats is not None:
        stats.update(loss=last, seconds=seconds, params=float(sum(p.numel() for p in model.parameters())))
    return batch * steps / seconds


def _param_counts() -> None:
    """Print ours vs diffusers' parameter count for the two reference layouts."""
    from diffusion_lightning.nets import UNet

    for name, net in (("fmnist default", FMNIST_DEFAULT_NET), ("ddpm cifar10", DDPM_CIFAR10_NET)):
        ours = sum(p.numel() for p in UNet(**net).parameters())
        theirs = sum(p.numel() for p in diffusers_unet(net).parameters())
        print(f"{name:15s} ours {ours:>11,d}  diffusers {theirs:>11,d}  diff {theirs - ours:+,d}")


if __name__ == "__main__":
    _param_counts()
