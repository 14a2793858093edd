"""Image grids during training: samples from fixed noise, so grids are comparable across epochs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchvision.utils import make_grid, save_image

from .ema import ema_module


class ImageGrid(L.Callback):
    """Every ``every_n_epochs`` epochs (``<dirpath>/epoch_XXXX.png``), every ``every_n_train_steps`` optimizer steps
    (``step_XXXXXXXX.png``) and at the end of training (``final.png``) write a grid of :meth:`images` and log it to
    TensorBoard under ``tag``. Subclasses say what the grid shows."""

    tag = "images"

    def __init__(self, dirpath: str = "grids", every_n_epochs: int = 1, every_n_train_steps: int = 0) -> None:
        self.dirpath, self.every_n_epochs, self.every_n_train_steps = Path(dirpath), every_n_epochs, every_n_train_steps
        self.last_path: Path | None = None

    def images(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, int]:
        """The grid's images in [0, 1] (on the CPU) and its number of images per row."""
        raise NotImplementedError

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        images, nrow = self.images(trainer, pl_module)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self.last_path = self.dirpath / f"{name}.png"
        save_image(images, self.last_path, nrow=nrow)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(self.tag, make_grid(images, nrow=nrow), global_step=trainer.global_step)

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_end draws the last grid: skip the epoch grid of the same weights
        last_epoch = 0 < (trainer.max_epochs or 0) <= trainer.current_epoch + 1
        ending = last_epoch or 0 < trainer.max_steps <= trainer.global_step
        if self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0 and not ending:
            self._draw(trainer, pl_module, f"epoch_{trainer.current_epoch:04d}")

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step, n = trainer.global_step, self.every_n_train_steps
        if n > 0 and step % n == 0 and not 0 < trainer.max_steps <= step:
            self._draw(trainer, pl_module, f"step_{step:08d}")

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer, pl_module, "final")


class SampleGrid(ImageGrid):
    """``num_samples`` samples with the EMA weights and the model's own sampler from the same initial noise at every
    grid. A class-conditional model gets one row per class (labels 0, 1, ...; ``num_samples // num_classes`` images a
    row), sampled at the model's own guidance scale."""

    tag = "samples"

    def __init__(
        self, dirpath: str = "grids", every_n_epochs: int = 1, num_samples: int = 64, seed: int = 0,
        every_n_train_steps: int = 0,
    ) -> None:
        super().__init__(dirpath, every_n_epochs, every_n_train_steps)
        self.num_samples, self.seed = num_samples, seed

    def images(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, int]:
        module = ema_module(trainer, pl_module)
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.num_samples, *module.sample_shape, generator=g)
        nrow = max(1, int(self.num_samples**0.5))
        y = None
        if module.num_classes:  # one row per class
            nrow = max(1, self.num_samples // module.num_classes)
            noise = noise[: nrow * module.num_classes]
            y = torch.arange(len(noise)) // nrow % module.num_classes
        images = module.sample(noise=noise, y=y, generator=g).float().cpu()
        return (images + 1) / 2, nrow
