"""Reconstructions of fixed test images by a first-stage autoencoder, so grids are comparable across epochs."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from .sample_grid import ImageGrid


class ReconstructionGrid(ImageGrid):
    """The first ``num_images`` test images in rows of 8, each row followed by its reconstructions
    (``module.reconstruct``)."""

    tag = "reconstructions"

    def __init__(self, dirpath: str = "grids", every_n_epochs: int = 1, num_images: int = 32) -> None:
        super().__init__(dirpath, every_n_epochs)
        self.num_images = num_images

    def images(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, int]:
        test = trainer.datamodule.dataset("test")
        x = torch.stack([test[i][0] for i in range(min(self.num_images, len(test)))])
        recon = pl_module.reconstruct(x).float().cpu()
        nrow = min(8, len(x))
        rows = [part for i in range(0, len(x), nrow) for part in (x[i : i + nrow], recon[i : i + nrow])]
        return (torch.cat(rows) + 1) / 2, nrow
