"""Exponential moving average of the weights, on Lightning's own ``WeightAveraging``.

The averaged copy is what a checkpoint's ``state_dict`` holds (the raw weights go to
``current_model_state``), what validation runs with, and what sampling and metrics use.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor


def ema_decay(decay: float, num_averaged: int, warmup: bool) -> float:
    """The decay for the next update: ``min(decay, (1 + n) / (10 + n))`` with warm-up (as in
    TensorFlow's ExponentialMovingAverage with num_updates), so early averages are not dominated
    by the random initialisation; the plain ``decay`` otherwise."""
    return min(decay, (1 + num_averaged) / (10 + num_averaged)) if warmup else decay


class EMA(WeightAveraging):
    """EMA of the parameters, updated every ``update_every_n_steps`` optimizer steps."""

    def __init__(
        self, decay: float = 0.9999, warmup: bool = True, update_every_n_steps: int = 1, device: str | None = None
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")

        @torch.no_grad()
        def update(ema: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
            d = ema_decay(decay, int(num_averaged), warmup)
            torch._foreach_lerp_(ema, current, 1.0 - d)

        super().__init__(device=device, use_buffers=False, multi_avg_fn=update)
        self.decay, self.warmup, self.update_every_n_steps = decay, warmup, update_every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the raw weights in the module (Lightning's default copies the average over them,
        and a ``last.ckpt`` written after that would resume from the EMA instead of the raw
        weights); the EMA stays available through :meth:`averaged_module` and checkpoints."""

    def averaged_module(self) -> L.LightningModule | None:
        """The LightningModule holding the EMA weights (None before fit has set it up)."""
        return None if self._average_model is None else self._average_model.module


def ema_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The EMA copy of ``pl_module`` if an :class:`EMA` callback is active, else ``pl_module``."""
    for callback in trainer.callbacks:
        if isinstance(callback, EMA) and (module := callback.averaged_module()) is not None:
            return module
    return pl_module
