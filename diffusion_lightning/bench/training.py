"""Training measurements of any recipe through its own training step: images/s under ``Trainer.fit`` (with the run's
EMA callback and gradient clipping) and in a plain PyTorch loop over the same module's ``training_step`` (automatic
optimisation only), peak CPU memory per image, and FLOPs per training image."""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..callbacks.ema import ema_decay
from ..utils import synchronize
from .recipes import build, ema_callbacks, gradient_clip, random_batches, run_config

# What a benchmark's Trainers say that is no news here (random data, no validation, no SLURM job).
for _message in (r"The `srun` command is available", r"Found \d+ module\(s\) in eval mode",
                 r"You defined a `validation_step`", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                 r"You are trying to `self.log\(\)`"):  # fmt: skip
    warnings.filterwarnings("ignore", message=_message)
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # GPU/TPU available, tips
logging.getLogger("diffusion_lightning.models.autoencoder").setLevel(logging.ERROR)  # "LPIPS off", for every build

_BUILT: dict[tuple[str, bool, bool], Any] = {}


def trained_model(spec: str, opts: argparse.Namespace) -> Any:
    """One module per recipe for all training measurements (Lightning's and the plain loop's), so that
    ``torch.compile`` compiles it once, not once per repeat."""
    key = (spec, bool(opts.channels_last), bool(opts.compile))
    if key not in _BUILT:
        _BUILT[key] = build(spec, channels_last=bool(opts.channels_last), compile=bool(opts.compile))
    return _BUILT[key]


def _quiet_trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, devices=1, **kwargs)  # fmt: skip


class _Timer(L.Callback):
    """Wall time of the training batches after ``warmup`` batches (the device synchronised at both ends)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self.end = time.perf_counter()


def lightning_throughput(spec: str, opts: argparse.Namespace, batch: int, steps: int, warmup: int,
                         model: Any = None) -> float:
    """Images/s of ``Trainer.fit`` on the recipe with its EMA callback, gradient clipping and logging."""
    model = model or trained_model(spec, opts)
    device, timer = torch.device(opts.device), _Timer(warmup)
    trainer = _quiet_trainer(accelerator=device.type, precision=opts.precision, max_steps=steps + warmup,
                             gradient_clip_val=gradient_clip(spec), callbacks=[*ema_callbacks(spec), timer])
    trainer.fit(model, train_dataloaders=random_batches(model, batch, steps + warmup, device.type == "cuda"))
    return batch * steps / (timer.end - timer.start)


def plain_throughput(spec: str, opts: argparse.Namespace, batch: int, steps: int, warmup: int,
                     stats: dict[str, Any] | None = None) -> float | None:
    """Images/s of a hand-written loop doing the same work on the same module: its ``training_step`` (the recipe's
    loss and logs), backward, gradient clipping, the configured optimiser and LR schedule, the recipe's after-step
    hook (a consistency model's target network) and the EMA update. None for a recipe that optimises itself
    (the autoencoder's generator and discriminator steps); on CUDA ``stats`` receives the peak memory."""
    model, device = trained_model(spec, opts), torch.device(opts.device)
    if not model.automatic_optimization:
        return None
    model.trainer = None  # no Trainer (a previous fit left one attached): the step's logs go nowhere
    model.to(device)
    clip, ema = gradient_clip(spec), run_config(spec).callbacks.get("ema")
    opt = model.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt.get("lr_scheduler", {}).get("scheduler")
    params = [p for p in model.parameters() if p.requires_grad]
    averaged = [p.detach().clone() for p in params] if ema else []
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = 0.0
    for i, (x0, y) in enumerate(random_batches(model, batch, steps + warmup, device.type == "cuda")):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        batch_ = (x0.to(device, non_blocking=True), y.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.precision.startswith("bf16")):
            loss = model.training_step(batch_, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        model.on_train_batch_end(loss, batch_, i)
        if ema:
            with torch.no_grad():
                torch._foreach_lerp_(averaged, [p.detach() for p in params], 1 - ema_decay(ema.decay, i, True))
    synchronize(device)
    seconds = time.perf_counter() - start
    if stats is not None and device.type == "cuda":
        stats["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return batch * steps / seconds


def _peak_rss_child(spec: str, precision: str, batch: int, conn: Any) -> None:
    """In a fresh process: a few Lightning steps at ``batch``; sends the process's peak resident memory (MiB), read
    from ``VmHWM`` (``getrusage``'s ``ru_maxrss`` would carry over the parent's peak through fork and exec)."""
    opts = argparse.Namespace(device="cpu", precision=precision, compile=False, channels_last=False)
    lightning_throughput(spec, opts, batch, 2, 1)
    status = Path("/proc/self/status").read_text()
    conn.send(int(status.split("VmHWM:")[1].split()[0]) / 1024)  # kB


def cpu_training_memory(spec: str, opts: argparse.Namespace, batch: int) -> dict[str, float]:
    """Peak resident memory of CPU training at ``batch`` and per training image: the slope between ``batch`` and
    ``batch // 4`` (each in a fresh process), which leaves out the interpreter, weights and optimiser state."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    peaks = {}
    for b in (max(1, batch // 4), batch):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_peak_rss_child, args=(spec, opts.precision, b, child))
        proc.start()
        peaks[b] = parent.recv()
        proc.join()
    small, large = sorted(peaks)
    return {"peak_memory_mib": round(peaks[large], 1),
            "peak_memory_mib_per_image": round((peaks[large] - peaks[small]) / max(1, large - small), 2)}


def flops_per_image(spec: str, batch: int = 2) -> float:
    """FLOPs per image of one training step under ``Trainer.fit`` (``torch.utils.flop_counter``, fp32 eager, a fresh
    module): every forward and backward of the step, a teacher's or target network's calls and a first stage's
    encoding included. (An autoencoder's step 0 is before its discriminator starts.)"""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(spec)
    trainer = _quiet_trainer(accelerator="cpu", precision="32-true", max_steps=1, gradient_clip_val=gradient_clip(spec))
    with FlopCounterMode(display=False) as counter:
        trainer.fit(model, train_dataloaders=random_batches(model, batch, 1))
    return counter.get_total_flops() / batch
