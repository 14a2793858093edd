"""Common LightningDataModule base and the in-memory dataset used by the concrete data modules.

Conventions shared by every data module of this package:

* images are float32 tensors of shape ``(C, H, W)`` scaled to ``[-1, 1]`` (uint8 ``x`` maps to ``x / 127.5 - 1``);
* every batch is a tuple ``(images, labels)``; ``labels`` is an int64 tensor (all zeros for unlabelled data);
* ``prepare_data()`` finds (and, if allowed, downloads) the data on rank 0 and raises
  :class:`~diffusion_lightning.data.errors.DatasetNotFoundError` when it is missing, before any training starts;
  ``setup()`` builds the datasets on every rank;
* the validation loader is a fixed subset of the test split, the test loader the full test split;
* random horizontal flips (``random_flip``) are applied to training batches only (in ``on_after_batch_transfer``);
* the training order and the flips are functions of ``(seed, epoch, batch)`` alone, never of torch's global
  generator, and the data module saves its place in the epoch: a run resumed from any checkpoint, mid-epoch
  included, sees the same batches as the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..images import from_uint8
from .errors import DatasetNotFoundError

#: Set to 1/true/yes to forbid every download attempt (same as ``download=False``).
OFFLINE_ENV_VAR = "DIFFUSION_LIGHTNING_OFFLINE"

SPLITS = ("train", "test")


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a float ``(C, H, W)`` image to ``(C, size, size)``, clamped to [-1, 1]."""
    if image.shape[-2:] == (size, size):
        return image
    out = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(-1.0, 1.0)


class TensorImageDataset(Dataset):
    """In-memory dataset of uint8 images ``(N, C, H, W)`` with int64 labels ``(N,)``.

    Items are ``(image, label)``: the image converted to float in ``[-1, 1]`` and resized (bilinear, antialias) to
    ``image_size`` if its size differs. The uint8 tensor is shared, never modified, so DataLoader workers (fork) do
    not copy it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.image_size = image_size

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = from_uint8(self.images[index])
        if self.image_size is not None:
            image = resize_square(image, self.image_size)
        return image, self.labels[index]


class EpochSampler(DistributedSampler):
    """The training order: a permutation drawn from ``seed + epoch`` alone (as ``DistributedSampler``), so it never
    touches torch's global generator, cut into global batches of ``num_replicas * batch_size`` of which rank r takes
    the r-th ``batch_size`` (incomplete global batches are dropped). So W ranks see each global batch a one-process run
    with batch W B sees, in its order (see :mod:`~diffusion_lightning.models.global_batch`). ``skip`` drops this
    rank's first indices in the next pass only: a run resumed mid-epoch continues the epoch where it stopped."""

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, epoch: int = 0,
        batch_size: int = 1,
    ) -> None:  # fmt: skip
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.epoch, self.batch_size, self.skip = epoch, batch_size, 0
        self.num_samples = len(dataset) // (num_replicas * batch_size) * batch_size  # type: ignore[arg-type]
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        super().set_epoch(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g)[: self.total_size]  # type: ignore[arg-type]
        mine = order.view(-1, self.num_replicas, self.batch_size)[:, self.rank].reshape(-1).tolist()
        self.skip, skip = 0, self.skip
        return iter(mine[skip:])


def batch_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (well mixed, so nearby keys give unrelated streams)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


@contextlib.contextmanager
def _socket_timeout(seconds: float | None):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


class ImageDataModule(L.LightningDataModule, ABC):
    """Base class of the image data modules (see the module docstring for the conventions).

    Args:
        root: dataset root folder; a relative path is relative to the current working directory at construction.
        image_size: side of the (square) images the loaders yield.
        batch_size: batch size of all three loaders (train drops its last incomplete batch).
        num_workers: DataLoader worker processes (workers are persistent when > 0 and ``persistent_workers``).
        pin_memory: pin host memory; only effective when CUDA is available.
        random_flip: random horizontal flips of training batches (never of val/test or :meth:`dataset`).
        val_samples: size of the fixed random subset of the test split used for validation; None = whole split.
        class_labels: whether consumers should use the labels (class-conditional models); batches always hold them.
        download: allow downloading missing data in :meth:`prepare_data` (also disabled by
            ``DIFFUSION_LIGHTNING_OFFLINE=1``).
        persistent_workers: keep workers alive between epochs (only when ``num_workers > 0``).
        seed: seed of the validation subset (and of any random train/test split).
        download_timeout: socket timeout in seconds during a download attempt, so it fails fast without network.
    """

    #: Human-readable dataset name used in messages.
    name: str = "dataset"

    def __init__(
        self,
        root: str = "data",
        image_size: int = 32,
        batch_size: int = 128,
        num_workers: int = 2,
        pin_memory: bool = True,
        random_flip: bool = False,
        val_samples: int | None = 1000,
        class_labels: bool = False,
        download: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        download_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        # Stored in checkpoints ("datamodule_hyper_parameters"); logger=False keeps them out of the logger's hparams
        # so they cannot clash with the LightningModule's. Collects the subclass' arguments too.
        self.save_hyperparameters(logger=False)
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if val_samples is not None and val_samples <= 0:
            raise ValueError(f"val_samples must be positive or None, got {val_samples}")
        self.root = Path(root).expanduser().absolute()
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.random_flip = bool(random_flip)
        self.val_samples = val_samples
        self.class_labels = bool(class_labels)
        self.download = bool(download)
        self.persistent_workers = bool(persistent_workers)
        self.seed = int(seed)
        self.download_timeout = download_timeout
        self._datasets: dict[str, Dataset] | None = None
        self._sampler: EpochSampler | None = None
        self._position = (0, 0)  # (epoch, training batches of it consumed so far)

    # ------------------------------------------------------------------ to implement in subclasses
    @property
    @abstractmethod
    def channels(self) -> int:
        """Number of image channels."""

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None for unlabelled data."""
        return None

    @property
    def class_names(self) -> list[str] | None:
        """Class names (index = label), or None."""
        return None

    @abstractmethod
    def _is_available(self) -> bool:
        """Cheap check (no download, no full read) that the data files are present; may raise DatasetCorruptError."""

    @abstractmethod
    def _not_found_error(self, reason: str | None = None) -> DatasetNotFoundError:
        """The error naming the expected paths and the command(s) that get the data."""

    def _download(self) -> None:
        """Download the data into :attr:`root` (may raise anything). Default: no download possible."""
        raise RuntimeError(f"{self.name} cannot be downloaded automatically")

    @abstractmethod
    def _load(self) -> None:
        """Read the data into memory (called once by :meth:`setup`, after the availability check)."""

    @abstractmethod
    def _make_dataset(self, split: str) -> Dataset:
        """Dataset of ``split`` ("train"/"test")."""

    # ------------------------------------------------------------------ availability / download
    @property
    def download_enabled(self) -> bool:
        offline = os.environ.get(OFFLINE_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")
        return self.download and not offline

    @property
    def pin_memory_effective(self) -> bool:
        return self.pin_memory and torch.cuda.is_available()

    def check_available(self) -> None:
        """Raise :class:`DatasetNotFoundError` if the data is not on disk (never downloads)."""
        if not self._is_available():
            raise self._not_found_error()

    def prepare_data(self) -> None:
        """Find the data, downloading it when missing and allowed; raise DatasetNotFoundError otherwise.

        Lightning calls this on (local) rank 0 before :meth:`setup`; training scripts may call it early themselves
        to fail fast with a one-line message (``except DatasetError as e: print(e)``).
        """
        if self._is_available():
            return
        if not self.download_enabled:
            reason = f"download disabled ({OFFLINE_ENV_VAR} is set)" if self.download else "download=False"
            raise self._not_found_error(reason)
        try:
            with _socket_timeout(self.download_timeout):
                self._download()
        except Exception as e:  # URLError, OSError, RuntimeError, ... -> one clear error
            raise self._not_found_error(f"download failed: {type(e).__name__}: {e}") from e
        if not self._is_available():
            raise self._not_found_error("download finished but the files are still missing")

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (every rank); raises DatasetNotFoundError if the data is missing."""
        if self._datasets is not None:
            return
        self.check_available()
        self._load()
        self._datasets = {split: self._make_dataset(split) for split in SPLITS}

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` ("train" or "test"), never augmented (flips happen per training batch).

        Calls :meth:`setup` if needed. Items are ``(image in [-1, 1] (C, H, W), int64 label)``.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self._datasets is None:
            self.setup()
        assert self._datasets is not None
        return self._datasets[split]

    def val_indices(self) -> list[int]:
        """Indices into the test split of the fixed validation subset (seeded, sorted)."""
        n = len(self.dataset("test"))
        if self.val_samples is None or self.val_samples >= n:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed)
        return sorted(torch.randperm(n, generator=g)[: self.val_samples].tolist())

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, sampler: EpochSampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=sampler is not None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory_effective,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            # worker seeds come from here, not from torch's global generator (the model's noise stream)
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by :class:`EpochSampler` (split across ranks under DDP), starting where :meth:`load_state_dict`
        left off; incomplete batches are dropped."""
        dataset = self.dataset("train")
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if len(dataset) < self.batch_size * world:
            raise ValueError(
                f"{self.name}: the train split has {len(dataset)} images, fewer than batch_size={self.batch_size} "
                f"x {world} device(s) (the train loader drops incomplete batches, so it would be empty)"
            )
        epoch, batches = self._position
        self._sampler = EpochSampler(dataset, world, rank, seed=self.seed, epoch=epoch, batch_size=self.batch_size)
        self._sampler.skip = batches * self.batch_size
        return self._loader(dataset, self._sampler)

    def val_dataloader(self) -> DataLoader:
        test = self.dataset("test")
        indices = self.val_indices()
        return self._loader(test if len(indices) == len(test) else Subset(test, indices))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"))

    # ------------------------------------------------------------------ augmentation and resumption
    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int) -> Any:
        """Count the training batch (the place :meth:`state_dict` saves) and flip it (``random_flip``): each image
        with probability 1/2, drawn from ``(seed, epoch, batch)`` for the global batch."""
        trainer = self.trainer
        if trainer is None or not trainer.training or self._sampler is None:
            return batch
        epoch, done = self._position if self._position[0] == self._sampler.epoch else (self._sampler.epoch, 0)
        self._position = (epoch, done + 1)
        if not self.random_flip:
            return batch
        images, labels = batch
        # drawn for the global batch (this rank's rows kept), so flips do not depend on the number of ranks
        b, g = len(images), batch_generator(self.seed, epoch, done, 0)
        rows = torch.rand(b * trainer.world_size, generator=g)[trainer.global_rank * b : (trainer.global_rank + 1) * b]
        flip = (rows < 0.5).to(images.device)
        return torch.where(flip[:, None, None, None], images.flip(-1), images), labels

    def state_dict(self) -> dict[str, int]:
        """Where training is in the data: the epoch and how many of its batches were consumed (saved in checkpoints)."""
        epoch, batches = self._position
        per_epoch = self.trainer.num_training_batches if self.trainer is not None else float("inf")
        return {"epoch": epoch + 1, "batches": 0} if batches >= per_epoch else {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._position = (int(state_dict["epoch"]), int(state_dict["batches"]))
        # Lightning warns that a mid-epoch resume repeats data unless the DataLoader is stateful; this module
        # restores the place itself (train_dataloader), so the warning would be wrong here.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, image_size={self.image_size}, channels={self.channels}, "
            f"batch_size={self.batch_size}, random_flip={self.random_flip})"
        )
