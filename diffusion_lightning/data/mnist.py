"""MNIST and Fashion-MNIST data modules (28x28 grayscale, 10 classes) read from IDX files.

Fashion-MNIST is looked for, in order, in the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/``), then in torchvision's layout ``<root>/FashionMNIST/raw/`` (``.gz`` or
uncompressed), and is finally downloaded with torchvision into ``root`` when allowed. MNIST is looked for in
``<root>/MNIST/raw/`` and downloaded the same way.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .base import ImageDataModule, TensorImageDataset
from .errors import DatasetNotFoundError
from .idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, check_idx_header, read_idx_tensor

RESIZE_MODES = ("pad", "resize")

# split -> (images file, labels file), without the optional ".gz"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx_files(directory: str | Path) -> dict[str, tuple[Path, Path]] | None:
    """The four MNIST-style IDX files in ``directory`` (uncompressed preferred over ``.gz``), or None if any lacks."""
    directory = Path(directory)
    found: dict[str, tuple[Path, Path]] = {}
    for split, names in IDX_FILES.items():
        paths = []
        for name in names:
            for candidate in (directory / name, directory / f"{name}.gz"):
                if candidate.is_file():
                    paths.append(candidate)
                    break
            else:
                return None
        found[split] = (paths[0], paths[1])
    return found


class _IDXDataModule(ImageDataModule):
    """Shared implementation of the MNIST-style (IDX, 1x28x28, 10 classes) data modules."""

    #: torchvision dataset class name (also the folder under root: ``<root>/<tv_name>/raw``).
    tv_name: str = ""
    #: system-wide folders holding the gz files (e.g. from a Debian package), searched before root.
    system_dirs: tuple[str, ...] = ()
    #: Debian package providing ``system_dirs``.
    apt_package: str | None = None
    labels_text: tuple[str, ...] = ()
    native_size = 28

    def __init__(self, resize: str = "pad", **kwargs: Any) -> None:
        """``resize``: how 28x28 becomes ``image_size`` (``pad`` with the background, or ``resize``); the other
        arguments are :class:`~.base.ImageDataModule`'s."""
        super().__init__(**kwargs)
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if resize == "pad" and self.image_size < self.native_size:
            raise ValueError(
                f'resize="pad" needs image_size >= {self.native_size}, got {self.image_size}; use "resize"'
            )
        self.resize = resize
        self._files: dict[str, tuple[Path, Path]] | None = None
        self._data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def channels(self) -> int:
        return 1

    @property
    def num_classes(self) -> int | None:
        return 10

    @property
    def class_names(self) -> list[str] | None:
        return list(self.labels_text)

    @property
    def raw_dir(self) -> Path:
        """torchvision's folder for the raw files: ``<root>/<Name>/raw``."""
        return self.root / self.tv_name / "raw"

    def search_dirs(self) -> list[Path]:
        return [*(Path(d) for d in self.system_dirs), self.raw_dir]

    def _locate(self) -> dict[str, tuple[Path, Path]] | None:
        for directory in self.search_dirs():
            files = find_idx_files(directory)
            if files is not None:
                return files
        return None

    def _is_available(self) -> bool:
        files = self._locate()
        if files is None:
            return False
        for images, labels in files.values():  # header-only validation: cheap, catches truncated/garbage files
            check_idx_header(images, IDX_IMAGES_MAGIC)
            check_idx_header(labels, IDX_LABELS_MAGIC)
        self._files = files
        return True

    def _not_found_error(self, reason: str | None = None) -> DatasetNotFoundError:
        paths = [f"{d}/" for d in self.search_dirs()]
        hint = "Expected files: " + ", ".join(f"{n}[.gz]" for pair in IDX_FILES.values() for n in pair)
        commands = []
        if self.apt_package:
            commands.append(f"sudo apt-get install {self.apt_package}")
        py = f"import torchvision; torchvision.datasets.{self.tv_name}({json.dumps(str(self.root))}, download=True)"
        commands.append(f"python -c {shlex.quote(py)}")
        return DatasetNotFoundError(self.name, paths, commands, reason, hint)

    def _download(self) -> None:
        import torchvision

        getattr(torchvision.datasets, self.tv_name)(str(self.root), train=True, download=True)

    def _load(self) -> None:
        assert self._files is not None
        for split, (images_path, labels_path) in self._files.items():
            images = read_idx_tensor(images_path, IDX_IMAGES_MAGIC)
            labels = read_idx_tensor(labels_path, IDX_LABELS_MAGIC)
            if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{self.name}: {images_path} has shape {tuple(images.shape)} but {labels_path} has "
                    f"{tuple(labels.shape)}: expected (N, H, W) images and (N,) labels"
                )
            images = images.unsqueeze(1)  # (N, 1, H, W), a view of the cached tensor
            if self.resize == "pad" and self.image_size > images.shape[-1]:
                total = self.image_size - images.shape[-1]
                lo, hi = total // 2, total - total // 2
                images = F.pad(images, (lo, hi, lo, hi), value=0)  # uint8 0 == background -1 after scaling
            self._data[split] = (images, labels.to(torch.int64))

    def _make_dataset(self, split: str) -> Dataset:
        images, labels = self._data[split]
        return TensorImageDataset(images, labels, image_size=self.image_size)


class FashionMNISTDataModule(_IDXDataModule):
    """Fashion-MNIST (60k train / 10k test, 1 channel, 10 classes), the framework's default dataset.

    ``resize="pad"`` pads the 28x28 images with the background value (-1) to ``image_size`` (32 by default: 2 pixels
    on each side); ``resize="resize"`` resizes them bilinearly (antialiased). ``image_size=28`` keeps them as-is.

    Data is searched in ``/usr/share/datasets/fashion-mnist/`` (``sudo apt-get install dataset-fashion-mnist``), then
    ``<root>/FashionMNIST/raw/``, then downloaded with torchvision (when ``download``).
    """

    name = "Fashion-MNIST"
    tv_name = "FashionMNIST"
    system_dirs = ("/usr/share/datasets/fashion-mnist",)
    apt_package = "dataset-fashion-mnist"
    labels_text = (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    )  # fmt: skip


class MNISTDataModule(_IDXDataModule):
    """MNIST digits (60k train / 10k test, 1 channel, 10 classes); same options as :class:`FashionMNISTDataModule`.

    Data is read from ``<root>/MNIST/raw/`` (torchvision's layout, ``.gz`` or uncompressed), else downloaded with
    torchvision (when ``download``).
    """

    name = "MNIST"
    tv_name = "MNIST"
    labels_text = tuple(str(i) for i in range(10))
