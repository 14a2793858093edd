"""Exponential moving average of the weights, on Lightning's own ``WeightAveraging``.

The averaged copy is what a checkpoint's ``state_dict`` holds (the raw weights go to
``current_model_state``), what validation runs with, and what sampling and metrics use.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging


def ema_decay(decay: float, num_averaged: int, warmup: bool) -> float:
    """The decay for the next update: ``min(decay, (1 + n) / (10 + n))`` with warm-up (as in
    TensorFlow's ExponentialMovingAverage with num_updates), so early averages are not dominated
    by the random initialisation; the plain ``decay`` otherwise."""
    return min(decay, (1 + num_averaged) / (10 + num_averaged)) if warmup else decay


class EMA(WeightAveraging):
    """EMA of the parameters, updated every ``update_every_n_steps`` optimizer steps.

    The update runs with a host-side count of the averages taken (read from the device once per fit), so a training
    step on a GPU makes no host-device synchronisation for it (torch's ``AveragedModel.update_parameters`` reads
    ``n_averaged`` from the device twice per call). The average is kept in float32 whatever the training precision
    (Lightning's ``*-mixed`` precisions keep float32 parameters).
    """

    def __init__(
        self, decay: float = 0.9999, warmup: bool = True, update_every_n_steps: int = 1, device: str | None = None
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        super().__init__(device=device, use_buffers=False)
        self.decay, self.warmup, self.update_every_n_steps = decay, warmup, update_every_n_steps
        self._num_averaged: int | None = None  # host copy of AveragedModel.n_averaged (set in on_train_start)
        self._params: tuple[list, list] | None = None  # (averaged, current) parameters (set in on_train_start)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # once per fit, after any checkpoint has been restored (into these same parameters)
        average = self._average_model
        assert average is not None, "WeightAveraging.setup builds the average before training starts"
        self._num_averaged = int(average.n_averaged)
        # buffers are not averaged (use_buffers=False) but follow the model: one set before training starts (latent
        # diffusion's scale factor, in on_fit_start) would otherwise stay at its value when the copy was made
        self._sync_frozen(pl_module)
        # trainable parameters only: a frozen part (latent diffusion's first stage) stays equal to its average
        pairs = [(e, p) for e, p in zip(average.parameters(), pl_module.parameters(), strict=True) if p.requires_grad]
        self._params = [e for e, _ in pairs], [p for _, p in pairs]

    @torch.no_grad()
    def _sync_frozen(self, pl_module: L.LightningModule) -> None:
        """Buffers and frozen parameters follow the model (they are not averaged): a model may change them in training
        (progressive distillation's teacher and round), and the copy is what validation and checkpoints hold."""
        if self._average_model is None:
            return
        for mine, theirs in zip(self._average_model.module.buffers(), pl_module.buffers(), strict=True):
            mine.copy_(theirs)
        for mine, theirs in zip(self._average_model.module.parameters(), pl_module.parameters(), strict=True):
            if not theirs.requires_grad:
                mine.copy_(theirs)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._sync_frozen(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._sync_frozen(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step_idx = trainer.global_step - 1  # as WeightAveraging: zero-based index of the optimizer step just taken
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self._update(pl_module)
            self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def _update(self, pl_module: L.LightningModule) -> None:
        """theta_ema <- d theta_ema + (1 - d) theta, with d = :func:`ema_decay` of the averages taken so far (the
        first update copies the weights)."""
        assert self._average_model is not None and self._params is not None and self._num_averaged is not None
        ema, params = self._params  # gathered once per fit: a module walk costs ~1 ms a step
        current = [p.detach().to(e.device) for p, e in zip(params, ema, strict=True)]
        if self._num_averaged == 0:
            torch._foreach_copy_(ema, current)
        else:
            torch._foreach_lerp_(ema, current, 1.0 - ema_decay(self.decay, self._num_averaged, self.warmup))
        self._average_model.n_averaged += 1
        self._num_averaged += 1

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
