"""Common LightningDataModule base and the in-memory dataset used by the concrete data modules.

Conventions shared by every data module of this package:

* images are float32 tensors of shape ``(C, H, W)`` scaled to ``[-1, 1]`` (uint8 ``x`` maps to ``x / 127.5 - 1``);
* every batch is a tuple ``(images, labels)``; ``labels`` is an int64 tensor (all zeros for unlabelled data);
* ``prepare_data()`` finds (and, if allowed, downloads) the data on rank 0 and raises
  :class:`~diffusion_lightning.data.errors.DatasetNotFoundError` when it is missing, before any training starts;
  ``setup()`` builds the datasets on every rank;
* the validation loader is a fixed subset of the test split, the test loader the full test split;
* random horizontal flips (``random_flip``) are applied to the training loader only.
"""

from __future__ import annotations

import contextlib
import os
import socket
from abc import ABC, abstractmethod
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import DatasetNotFoundError

#: Set to 1/true/yes to forbid every download attempt (same as ``download=False``).
OFFLINE_ENV_VAR = "DIFFUSION_LIGHTNING_OFFLINE"

SPLITS = ("train", "test")


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixel values to float32 in ``[-1, 1]`` (0 -> -1, 255 -> 1)."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a float ``(C, H, W)`` image to ``(C, size, size)``, clamped to [-1, 1]."""
    if image.shape[-2:] == (size, size):
        return image
    out = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(-1.0, 1.0)


class TensorImageDataset(Dataset):
    """In-memory dataset of uint8 images ``(N, C, H, W)`` with int64 labels ``(N,)``.

    Items are ``(image, label)``: the image converted to float in ``[-1, 1]``, resized (bilinear, antialias) to
    ``image_size`` if its size differs, and flipped horizontally with probability 1/2 when ``random_flip``.
    The uint8 tensor is shared, never modified, so DataLoader workers (fork) do not copy it.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, image_size: int | None = None, random_flip: bool = False
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.image_size = image_size
        self.random_flip = random_flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = uint8_to_float(self.images[index])
        if self.image_size is not None:
            image = resize_square(image, self.image_size)
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.labels[index]


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
        random_flip: random horizontal flips on the training loader (never on val/test or :meth:`dataset`).
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
    def _make_dataset(self, split: str, augment: bool) -> Dataset:
        """Dataset of ``split`` ("train"/"test"); ``augment`` adds the training augmentation (random flip)."""

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
        self._datasets = {
            "train_aug": self._make_dataset("train", augment=self.random_flip),
            "train": self._make_dataset("train", augment=False),
            "test": self._make_dataset("test", augment=False),
        }

    def dataset(self, split: str, augment: bool = False) -> Dataset:
        """The dataset of ``split`` ("train" or "test") for evaluation code: no augmentation unless ``augment``.

        Calls :meth:`setup` if needed. Items are ``(image in [-1, 1] (C, H, W), int64 label)``.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self._datasets is None:
            self.setup()
        assert self._datasets is not None
        if split == "train" and augment and self.random_flip:
            return self._datasets["train_aug"]
        return self._datasets[split]

    def val_indices(self) -> list[int]:
        """Indices into the test split of the fixed validation subset (seeded, sorted)."""
        n = len(self.dataset("test"))
        if self.val_samples is None or self.val_samples >= n:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed)
        return sorted(torch.randperm(n, generator=g)[: self.val_samples].tolist())

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory_effective,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train", augment=True)
        if len(dataset) < self.batch_size:
            raise ValueError(
                f"{self.name}: the train split has {len(dataset)} images, fewer than batch_size={self.batch_size} "
                "(the train loader drops incomplete batches, so it would be empty)"
            )
        return self._loader(dataset, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        test = self.dataset("test")
        indices = self.val_indices()
        dataset = test if len(indices) == len(test) else Subset(test, indices)
        return self._loader(dataset, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False, drop_last=False)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, image_size={self.image_size}, channels={self.channels}, "
            f"batch_size={self.batch_size}, random_flip={self.random_flip})"
        )
