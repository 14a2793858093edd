"""Data module for an arbitrary folder of images (unlabelled)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ..images import from_uint8
from .base import ImageDataModule
from .errors import DatasetNotFoundError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(directory: str | Path) -> list[Path]:
    """All image files (by extension, case-insensitive) under ``directory``, recursively, sorted; skips dot-files."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def load_image(path: str | Path, image_size: int, channels: int = 3) -> torch.Tensor:
    """Load an image as uint8 ``(C, image_size, image_size)``: shorter side resized (bicubic), then center-cropped."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img = img.convert("RGB" if channels == 3 else "L")
    w, h = img.size
    scale = image_size / min(w, h)
    new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class ImageFileDataset(Dataset):
    """Images read from disk on access: items are ``(float image in [-1, 1] (C, S, S), label 0)``."""

    def __init__(self, files: list[Path], image_size: int, channels: int = 3) -> None:
        self.files = list(files)
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = from_uint8(load_image(self.files[index], self.image_size, self.channels))
        return image, torch.tensor(0, dtype=torch.int64)


class ImageFolderDataModule(ImageDataModule):
    """Any folder of images (png/jpg/jpeg/webp/bmp, searched recursively), unlabelled (labels are all 0).

    Images are resized (shorter side to ``image_size``, bicubic) and center-cropped, converted to RGB
    (``channels=3``) or grayscale (``channels=1``). The files under ``root`` are split 90/10 (``test_fraction``) into
    train/test with a fixed ``seed``; alternatively give ``test_dir`` (and optionally ``train_dir``, default ``root``)
    to use separate folders. Relative ``train_dir``/``test_dir`` are relative to ``root``. Nothing is downloaded.
    """

    name = "image folder"

    def __init__(
        self,
        root: str = "data",
        image_size: int = 64,
        channels: int = 3,
        train_dir: str | None = None,
        test_dir: str | None = None,
        test_fraction: float = 0.1,
        **kwargs: Any,
    ) -> None:
        """The other arguments are :class:`~.base.ImageDataModule`'s (``download`` is always off: nothing to get)."""
        super().__init__(root=root, image_size=image_size, **{**kwargs, "download": False})
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        self._channels = channels
        self.train_dir = self.root / train_dir if train_dir else self.root
        self.test_dir = self.root / test_dir if test_dir else None
        self.test_fraction = test_fraction
        self._files: dict[str, list[Path]] | None = None

    @property
    def channels(self) -> int:
        return self._channels

    def _dirs(self) -> list[Path]:
        return [self.train_dir] + ([self.test_dir] if self.test_dir is not None else [])

    def _split_files(self) -> dict[str, list[Path]]:
        train = list_images(self.train_dir)
        if self.test_dir is not None:
            return {"train": train, "test": list_images(self.test_dir)}
        n_test = int(round(len(train) * self.test_fraction))
        if self.test_fraction > 0 and len(train) >= 2:
            n_test = min(max(n_test, 1), len(train) - 1)
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(train), generator=g).tolist()
        test_idx = set(perm[:n_test])
        return {
            "train": [f for i, f in enumerate(train) if i not in test_idx],
            "test": [f for i, f in enumerate(train) if i in test_idx],
        }

    def _is_available(self) -> bool:
        if self._files is None:
            files = self._split_files()
            if not files["train"] or (self.test_dir is not None and not files["test"]):
                return False
            self._files = files
        return True

    def _not_found_error(self, reason: str | None = None) -> DatasetNotFoundError:
        problems = []
        for d in self._dirs():
            if not d.is_dir():
                problems.append(f"{d} does not exist")
            elif not list_images(d):
                problems.append(f"{d} holds no images")
        ext = "/".join(e[1:] for e in IMAGE_EXTENSIONS)
        hint = f"{'; '.join(problems)}. Put {ext} files there (subfolders are searched) or set root to such a folder"
        return DatasetNotFoundError(self.name, [f"{d}/" for d in self._dirs()], (), reason, hint)

    def prepare_data(self) -> None:
        self.check_available()  # nothing can be downloaded

    def _load(self) -> None:
        pass  # images are read lazily by ImageFileDataset

    def _make_dataset(self, split: str) -> Dataset:
        assert self._files is not None
        return ImageFileDataset(self._files[split], self.image_size, self._channels)
