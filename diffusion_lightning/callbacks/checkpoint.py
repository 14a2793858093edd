"""Checkpointing: Lightning's ModelCheckpoint, with ``last.ckpt`` always at the final step and resumable exactly."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with three fixes to ``last.ckpt`` (``save_last=True``):

    * a run that stops at ``max_steps`` writes it at the end of its final batch, like a periodic save. Lightning's
      own save at the end of training comes after the loop has closed the epoch, so a run continued from it with a
      larger ``max_steps`` would skip the rest of that epoch's batches; from the batch-end checkpoint it goes on
      exactly as if uninterrupted (training in chunks);
    * at the end of training it is written when the last periodic save (``every_n_train_steps``) came before the
      final step, which Lightning skips once any ``last.ckpt`` has been written;
    * ``enable_version_counter`` defaults to False, so a run continued in its own folder overwrites ``last.ckpt``.
      Lightning otherwise keys its saved state by the constructor arguments: a continuation with another
      ``every_n_train_steps`` did not recognise its ``last.ckpt``, wrote ``last-v1.ckpt`` and left a stale
      ``last.ckpt`` behind. Periodic files are named by their step, so they do not collide within a run.

    Every file is written atomically: to ``<name>.tmp``, then renamed over ``<name>``, so a process killed while
    writing leaves the previous ``last.ckpt`` whole. No save runs after an exception (a NaN loss, say), so the last
    good checkpoint stays."""

    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save_last_if_due(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last_if_due(trainer)
        super().on_train_end(trainer, pl_module)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier("checkpoint_renamed")
        self._last_checkpoint_saved = filepath

    def save_last_now(self, trainer: L.Trainer) -> str:
        """Write ``last.ckpt`` now, whatever the schedule (on preemption, :class:`~.requeue.Requeue`); its path."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path

    def _save_last_if_due(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
