"""Benchmarks: ``python -m diffusion_lightning.bench [--out FILE] [--steps N] [--batch B]``.

Measures, in one run on the default experiment's model (``ddpm_fmnist``, composed from ``conf/`` with its
network, optimiser, EMA decay and gradient clipping), batch and loss:
- training throughput (images/s) of the ``DDPM`` LightningModule under ``Trainer.fit`` and of a plain
  PyTorch loop doing the same work (forward, L_simple, backward, grad clip, AdamW, EMA update), and
  their ratio (the Lightning overhead);
- DDIM-50 sampling throughput (images/s) with the same network;
- feature-extraction throughput (images/s) of the FID/KID/IS extractors on 32x32 uint8 images (``inception`` is
  skipped, with the reason recorded, when its weights are absent: ``make inception-weights``).
Results go to a JSON file (default ``outputs/bench/bench.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from .callbacks import EMA
from .callbacks.ema import ema_decay
from .models import DDPM

EXPERIMENT = "ddpm_fmnist"  # the default experiment (`make train`), composed from conf/ as train.py composes it


@functools.cache
def _config() -> DictConfig:
    with initialize_config_dir(str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={EXPERIMENT}"])


def _model() -> DDPM:
    torch.manual_seed(0)
    return instantiate(_config().model)


def _data(batch: int, steps: int) -> TensorDataset:
    c, s = _config().model.net.in_channels, _config().data.image_size
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(batch * steps, c, s, s, generator=g) * 2 - 1, torch.zeros(batch * steps).long())


class _Timer(L.Callback):
    """Wall time of the training batches after ``warmup`` batches."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.end = time.perf_counter()


def lightning_throughput(batch: int, steps: int, warmup: int) -> float:
    model, cfg = _model(), _config()
    timer = _Timer(warmup)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps + warmup, gradient_clip_val=cfg.trainer.gradient_clip_val, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[EMA(decay=cfg.callbacks.ema.decay), timer], limit_val_batches=0, num_sanity_val_steps=0,
    )
    loader = DataLoader(_data(batch, steps + warmup), batch_size=batch, shuffle=True)
    trainer.fit(model, train_dataloaders=loader)
    return batch * steps / (timer.end - timer.start)


def plain_throughput(batch: int, steps: int, warmup: int) -> float:
    model = _model()
    clip, decay = _config().trainer.gradient_clip_val, _config().callbacks.ema.decay  # read once, off the timed loop
    opt = model.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt.get("lr_scheduler", {}).get("scheduler")
    ema = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(_data(batch, steps + warmup), batch_size=batch, shuffle=True)
    model.train()
    start = 0.0
    for i, (x0, y) in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        losses = model.loss_terms(x0, y)["loss"]
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - ema_decay(decay, i, True))
    return batch * steps / (time.perf_counter() - start)


def sampling_throughput(num_samples: int, steps: int = 50) -> float:
    model = _model().eval()
    g = torch.Generator().manual_seed(0)
    model.sample(2, generator=g, sampler={"name": "ddim", "steps": 2})  # warm-up
    start = time.perf_counter()
    model.sample(num_samples, generator=g, sampler={"name": "ddim", "steps": steps})
    return num_samples / (time.perf_counter() - start)


def nll_throughput(num_images: int, num_strata: int = 20) -> dict[str, Any]:
    """Images/s of the bound (bits/dim) for the default network with the full T-term loop and the stratified
    estimate, and the projected time for a 10k-image test set."""
    from .diffusion.vlb import calc_bpd_loop

    model = _model().eval()
    g = torch.Generator().manual_seed(0)
    x0 = _data(num_images, 1).tensors[0]
    T = model.diffusion.num_timesteps
    start = time.perf_counter()
    model.nll(x0, num_strata=num_strata, generator=g)
    strat_ips = num_images / (time.perf_counter() - start)
    small = model.diffusion.respace(range(0, T, max(1, T // 50)))  # time 50 of the T steps, scale to T
    start = time.perf_counter()
    calc_bpd_loop(model.denoiser(), small, x0, model.variance_type, clip_denoised=True, generator=g)
    full_ips = num_images / ((time.perf_counter() - start) * T / small.num_timesteps)
    return {
        "num_images": num_images, "num_timesteps": T, "num_strata": num_strata,
        "stratified_images_per_s": round(strat_ips, 3), "full_images_per_s": round(full_ips, 4),
        "test_10k_stratified_s": round(1e4 / strat_ips), "test_10k_full_s": round(1e4 / full_ips),
    }


def feature_throughput(name: str, batch: int, repeats: int) -> dict[str, Any]:
    """Images/s of extractor ``name`` on random 1x32x32 uint8 batches (best of ``repeats``), or why it was skipped."""
    from .metrics import get_extractor

    kwargs: dict[str, Any] = {"download": False} if name == "inception" else {}
    try:
        extractor = get_extractor(name, **kwargs)
    except FileNotFoundError as e:
        return {"batch": batch, "images_per_s": None, "skipped": str(e)}
    images = torch.randint(0, 256, (batch, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    extractor(images[:2])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        extractor(images)
        times.append(time.perf_counter() - start)
    return {"batch": batch, "repeats": repeats, "images_per_s": round(batch / min(times), 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench/bench.json")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="alternating Lightning/plain measurements")
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--inception-batch", type=int, default=32, help="images for the Inception throughput")
    parser.add_argument("--classifier-batch", type=int, default=256, help="images for the fmnist-classifier throughput")
    parser.add_argument("--nll-images", type=int, default=64, help="images for the NLL (bits/dim) throughput")
    args = parser.parse_args(argv)

    lightning_runs, plain_runs = [], []
    for _ in range(args.repeats):  # alternate so drifts in machine load hit both alike
        plain_runs.append(plain_throughput(args.batch, args.steps, args.warmup))
        lightning_runs.append(lightning_throughput(args.batch, args.steps, args.warmup))
    lightning_ips, plain_ips = max(lightning_runs), max(plain_runs)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "model": {
            "experiment": EXPERIMENT, "net": OmegaConf.to_container(_config().model.net, resolve=True),
            "params": sum(p.numel() for p in _model().parameters())},
        "train": {
            "batch": args.batch, "timed_steps": args.steps,
            "lightning_images_per_s": round(lightning_ips, 2), "plain_images_per_s": round(plain_ips, 2),
            "lightning_over_plain": round(lightning_ips / plain_ips, 4),
            "overhead_percent": round(100 * (plain_ips / lightning_ips - 1), 2),
            "runs": {"lightning": [round(v, 2) for v in lightning_runs], "plain": [round(v, 2) for v in plain_runs]},
        },
        "sample": {"sampler": "ddim", "steps": 50, "batch": args.sample_batch,
                   "images_per_s": round(sampling_throughput(args.sample_batch), 2)},
        "nll": nll_throughput(args.nll_images),
        "features": {
            "fmnist-classifier": feature_throughput("fmnist-classifier", args.classifier_batch, repeats=5),
            "inception": feature_throughput("inception", args.inception_batch, repeats=1),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
