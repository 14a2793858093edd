"""Callbacks for the DDP and SLURM tests, importable by the processes they start (tests/ on PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from diffusion_lightning.callbacks import ema_module


class SaveRankState(L.Callback):
    """At the end of training, rank r writes ``<dirpath>/rank<r>.pt``: its raw and EMA weights."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {"raw": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                 "ema": {k: v.detach().cpu().clone() for k, v in ema_module(trainer, pl_module).state_dict().items()}}
        torch.save(state, self.dirpath / f"rank{trainer.global_rank}.pt")


class Slow(L.Callback):
    """Sleep after every training batch, so that a test can signal a run in the middle of it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: object) -> None:
        import time

        time.sleep(self.seconds)


class StallSave(L.Callback):
    """Checkpoint write number ``call`` stops halfway: half its bytes on disk, then ``marker`` is created and the
    process sleeps until a test kills it (a kill during a checkpoint write)."""

    def __init__(self, marker: str, call: int) -> None:
        self.marker, self.call, self.calls = marker, call, 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import io
        import time

        io_plugin = trainer.strategy.checkpoint_io
        original = io_plugin.save_checkpoint

        def save(checkpoint: dict, path: str, storage_options: object = None) -> None:
            self.calls += 1
            if self.calls < self.call:
                return original(checkpoint, path, storage_options)
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            with open(path, "wb") as f:
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
            Path(self.marker).touch()
            time.sleep(600)

        io_plugin.save_checkpoint = save
