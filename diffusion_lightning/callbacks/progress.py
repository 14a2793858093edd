"""Progress of a training run: a rich bar on a terminal that counts the steps of step-limited runs, plain log lines
everywhere else (:func:`progress_bar` picks)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar as LightningProgressBar

log = logging.getLogger(__name__)


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


class PlainProgress(LightningProgressBar):
    """Progress as plain log lines, for output that is no terminal (a SLURM job, ``nohup``, CI), where a rich bar
    prints nothing until the run ends: every ``every_s`` seconds (and at the last step) one line ``step 1200/5000 ·
    210.3 img/s · loss 0.0312 · elapsed 5m42s · ETA 18m10s``, through the logging system, so it also reaches the run's
    ``train.log`` as the run goes. The loss is read from the host at those lines only."""

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = float(every_s)
        self._enabled = True
        self._start = self._last = 0.0
        self._start_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        self._start_step = trainer.global_step
        if self._enabled:
            total = trainer.max_steps if trainer.max_steps > 0 else "?"
            log.info(f"training from step {trainer.global_step} to {total}; progress every {self.every_s:.0f} s")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        now, step, total = time.monotonic(), trainer.global_step, trainer.max_steps
        if not self._enabled or not trainer.is_global_zero or (now - self._last < self.every_s and step != total):
            return
        self._last = now
        elapsed, done = now - self._start, step - self._start_step
        batch_size = len(batch[0]) if isinstance(batch, list | tuple) else len(batch)
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"step {step}/{total if total > 0 else '?'}", f"{rate * batch_size * trainer.world_size:.1f} img/s"]
        if (loss := trainer.callback_metrics.get("train/loss")) is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"elapsed {_duration(elapsed)}")
        if total > 0 and rate > 0:
            parts.append(f"ETA {_duration((total - step) / rate)}")
        log.info(" · ".join(parts))


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_bar(every_s: float = 30.0) -> LightningProgressBar:
    """The rich bar on a terminal, :class:`PlainProgress` lines when standard output is a file or a pipe."""
    return ProgressBar() if sys.stdout.isatty() else PlainProgress(every_s)
