"""Rich progress bar that counts the steps of step-limited runs."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar``; a run limited by ``max_steps`` (``max_epochs=-1``) shows
    ``Epoch 3 · step 1200/5000``, updated every batch, instead of Lightning's ``Epoch 3/-2``. The metrics it shows
    (the loss) are read at logging steps only: reading them copies device tensors to the host, which would make every
    training step wait for the GPU."""

    def _by_steps(self) -> bool:
        return (self.trainer.max_epochs or -1) <= 0 and self.trainer.max_steps > 0

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's (private) description hook
        if not self._by_steps():
            return super()._get_train_description(current_epoch)
        trainer = self.trainer
        description = f"Epoch {current_epoch} · step {trainer.global_step}/{trainer.max_steps}"
        return f"{description:{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._by_steps() and self.progress is not None and self.train_progress_bar_id is not None:
            description = self._get_train_description(trainer.current_epoch)
            self.progress.update(self.train_progress_bar_id, description=description)
        super().on_train_batch_end(trainer, pl_module, *args)

    def _update_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training and not trainer._logger_connector.should_update_logs:
            return
        super()._update_metrics(trainer, pl_module)
