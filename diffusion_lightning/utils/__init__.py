"""Small utilities the entry points and callbacks share (so that no entry point imports another)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from hydra.errors import InstantiationException
from rich.progress import track
from torch import Tensor

from ..data.errors import DatasetError
from ..errors import UserError
from ..images import to_uint8

R = TypeVar("R")


def run_or_exit(fn: Callable[[Any], R], cfg: Any) -> R:
    """Run an entry point; bad input ends it with its message and exit code 2, no stack trace. A run that fails
    leaves no folder that holds only its config and log (nor the empty parents above it)."""
    from pathlib import Path

    from ..run_folder import drop_empty_run

    try:
        paths = cfg.get("paths") or {}
        folder = Path(paths["output_dir"])
        log_dir = Path(paths["log_dir"]) if paths.get("log_dir") else folder.parent
    except Exception:  # noqa: BLE001 - no Hydra run folder (a config composed in a test)
        folder = log_dir = None
    try:
        return fn(cfg)
    except BaseException as e:
        if folder is not None:
            drop_empty_run(folder, log_dir)
        if isinstance(e, InstantiationException) and isinstance(e.__cause__, UserError | DatasetError):
            e = e.__cause__  # a component's own error (a teacher's checkpoint), not Hydra's wrapping of it
        if isinstance(e, UserError | DatasetError | InstantiationException | FloatingPointError):
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
            sys.exit(2)
        raise


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA; nothing elsewhere): before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU) or a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sampling_autocast(device: torch.device, precision: str | int = "32") -> contextlib.AbstractContextManager:
    """The network evaluations of sampling in ``precision``: ``32`` (float32, the default) or ``bf16`` (bfloat16
    autocast: convolutions and matmuls in bfloat16, the sampler's state and arithmetic stay float32, as training's
    ``bf16-mixed``; faster on a CPU with native bfloat16, measured in docs/performance.md)."""
    if str(precision) in ("32", "32-true"):
        return contextlib.nullcontext()
    if str(precision) in ("bf16", "bf16-mixed"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise UserError(f"unknown sampling precision {precision!r}: use 32 or bf16")


def generate(
    model: Any,
    num_samples: int,
    batch_size: int,
    generator: torch.Generator,
    sampler: Mapping[str, Any] | None = None,
    show_progress: bool = False,
    uint8: bool = False,
    guidance: float | None = None,
    return_labels: bool = False,
    labels: Tensor | None = None,
    precision: str | int = "32",
) -> tuple[Tensor, int] | tuple[Tensor, int, Tensor | None]:
    """``num_samples`` images from ``model.sample`` in batches drawn from one generator, on the CPU: floats in
    [-1, 1], or with ``uint8`` quantised as saved PNGs are (:func:`~diffusion_lightning.images.to_uint8`). Returns
    them with the counted network evaluations per sample (and with ``return_labels`` the class labels drawn for a
    class-conditional model, else None). ``sampler`` and ``guidance`` None: the model's own; ``labels`` (num_samples,)
    the classes to draw (None: uniformly random ones); ``precision`` of the network (:func:`sampling_autocast`)."""
    chunks, drawn, nfe = [], [], 0
    starts = range(0, num_samples, batch_size)
    for start in track(starts, description="sampling", transient=True) if show_progress else starts:
        n = min(batch_size, num_samples - start)
        y = None
        if model.num_classes:
            y = labels[start : start + n] if labels is not None else torch.randint(0, model.num_classes, (n,),
                                                                                    generator=generator)
        with sampling_autocast(model.device, precision):
            images, nfe = model.sample(n, y=y, generator=generator, sampler=sampler, guidance=guidance,
                                       return_nfe=True)  # fmt: skip
        images = images.float().cpu()
        chunks.append(to_uint8(images) if uint8 else images)
        drawn.append(y)
    if return_labels:
        return torch.cat(chunks), nfe, torch.cat(drawn) if model.num_classes else None
    return torch.cat(chunks), nfe
