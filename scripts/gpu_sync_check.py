"""On a CUDA GPU: train a model under ``torch.cuda.set_sync_debug_mode("warn")`` and count the synchronising CUDA
operations inside non-logging training steps (the framework promises none; ``tests/system/test_speed.py`` checks the
same on the CPU by watching host reads). Usage:
``python scripts/gpu_sync_check.py [EXPERIMENT (default ddpm_fmnist)] [--out FILE]``."""

from __future__ import annotations

import argparse
import json
import tempfile
import traceback
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from diffusion_lightning.bench.recipes import build, ema_callbacks, gradient_clip, random_batches
from diffusion_lightning.callbacks import ProgressBar


class SyncWatch(L.Callback):
    """Warn-mode sync debugging from the start to the end of every non-logging batch after ``skip`` warm-up ones
    (which compile). It is the last callback, so the EMA update and the progress bar run inside the window."""

    def __init__(self, skip: int) -> None:
        self.skip, self.watched, self.syncs, self._caught = skip, 0, [], None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step < self.skip or trainer._logger_connector.should_update_logs:
            return
        self.watched += 1
        self._context = warnings.catch_warnings(record=True)
        self._caught = self._context.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._caught is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        for w in self._caught:
            if "synchroniz" in str(w.message):
                self.syncs.append({"step": trainer.global_step, "where": f"{w.filename}:{w.lineno}"})
        self._context.__exit__(None, None, None)
        self._caught = None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="ddpm_fmnist")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = build(args.model, channels_last=True, compile=True)
    loader = random_batches(model, 128, args.steps, pin_memory=True)
    watch = SyncWatch(skip=5)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=args.steps, log_every_n_steps=10,
            gradient_clip_val=gradient_clip(args.model), logger=TensorBoardLogger(tmp), enable_checkpointing=False,
            limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp,
            callbacks=[*ema_callbacks(args.model), ProgressBar(), watch],
        )
        try:
            trainer.fit(model, train_dataloaders=loader)
            error = None
        except Exception:
            error = traceback.format_exc()
    result = {"model": args.model, "steps": args.steps, "watched_steps": watch.watched,
              "syncs": len(watch.syncs), "where": sorted({s["where"] for s in watch.syncs}), "error": error}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
