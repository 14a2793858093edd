"""Reconstructions of fixed test images by a first-stage autoencoder, so grids are comparable across epochs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image


class ReconstructionGrid(L.Callback):
    """Every ``every_n_epochs`` epochs and at the end of training, write ``<dirpath>/<name>.png``: rows alternating
    ``num_images`` // 8 rows of the first test images and their reconstructions (``module.reconstruct``), and log it to
    TensorBoard."""

    def __init__(self, dirpath: str = "grids", every_n_epochs: int = 1, num_images: int = 32) -> None:
        self.dirpath, self.every_n_epochs, self.num_images = Path(dirpath), every_n_epochs, num_images
        self.last_path: Path | None = None

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        test = trainer.datamodule.dataset("test")
        x = torch.stack([test[i][0] for i in range(min(self.num_images, len(test)))])
        recon = pl_module.reconstruct(x).float().cpu()
        nrow = min(8, len(x))
        rows = [part for i in range(0, len(x), nrow) for part in (x[i : i + nrow], recon[i : i + nrow])]
        images = (torch.cat(rows) + 1) / 2
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self.last_path = self.dirpath / f"{name}.png"
        save_image(images, self.last_path, nrow=nrow)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("reconstructions", make_grid(images, nrow=nrow), global_step=trainer.global_step)

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last_epoch = 0 < (trainer.max_epochs or 0) <= trainer.current_epoch + 1
        ending = last_epoch or 0 < trainer.max_steps <= trainer.global_step
        if self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0 and not ending:
            self._draw(trainer, pl_module, f"epoch_{trainer.current_epoch:04d}")

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer, pl_module, "final")
