"""The diffusers side of the training-throughput benchmark: our U-Net's layout built as diffusers' ``UNet2DModel``
(:func:`~diffusion_lightning.interop.diffusers.diffusers_unet`), trained with the recipe of diffusers'
``examples/unconditional_image_generation/train_unconditional.py``. ``python -m diffusion_lightning.bench.diffusers``
prints both parameter counts of the two reference layouts (identical).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..interop.diffusers import diffusers_unet, import_diffusers
from ..utils import synchronize
from .recipes import net_config

#: The two layouts whose parameter counts are checked (tests/system/test_bench_diffusers.py and ``__main__``): the
#: default's small U-Net and the DDPM paper's 35.7M CIFAR-10 U-Net.
REFERENCE_EXPERIMENTS = ("ddpm_fmnist", "ddpm_cifar")


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
    diffusers = import_diffusers()
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

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
    synchronize(dev)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = step(i)
    synchronize(dev)
    seconds = time.perf_counter() - start
    last = float(loss)
    if not math.isfinite(last):
        raise FloatingPointError(f"diffusers training loss is {last} after {warmup + steps} steps")
    if stats is not None:
        stats.update(loss=last, seconds=seconds, params=float(sum(p.numel() for p in model.parameters())))
    return batch * steps / seconds


def _param_counts() -> None:
    """Print ours (the recipe as training builds it) vs diffusers' parameter count for the two reference layouts."""
    from .recipes import build

    for name in REFERENCE_EXPERIMENTS:
        ours = sum(p.numel() for p in build(name).parameters())
        theirs = sum(p.numel() for p in diffusers_unet(net_config(name)).parameters())
        print(f"{name:15s} ours {ours:>11,d}  diffusers {theirs:>11,d}  diff {theirs - ours:+,d}")


if __name__ == "__main__":
    _param_counts()
