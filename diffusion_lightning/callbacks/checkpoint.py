"""Checkpointing: Lightning's ModelCheckpoint, with ``last.ckpt`` always at the final step."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``; at the end of training it also writes ``last.ckpt`` when the
    last periodic save (``every_n_train_steps``) came before the final step, which Lightning skips
    once any ``last.ckpt`` has been written. Not called after an exception (a NaN loss, say), so the
    last good checkpoint stays."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
