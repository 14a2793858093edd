"""CIFAR-10 data module, reading CIFAR's own "python version" batch files.

The files live in ``<root>/cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` (train), ``test_batch`` and
``batches.meta``. Each batch is a pickled dict whose ``data`` entry is a uint8 array of shape ``(N, 3072)`` -- per row
the 1024 red, then 1024 green, then 1024 blue values of a 32x32 image, each plane row-major -- and whose ``labels``
entry is a list of N ints in 0..9; ``batches.meta`` holds ``label_names``.

torchvision's ``CIFAR10`` is used only to *download* the archive when the folder is missing (it verifies md5 sums,
which hand-made files cannot match); the files themselves are read by :func:`read_cifar_batch`.
"""

from __future__ import annotations

import importlib
import json
import pickle
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import ImageDataModule, TensorImageDataset
from .errors import DatasetCorruptError, DatasetNotFoundError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
CIFAR10_META_FILE = "batches.meta"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The only globals a CIFAR batch pickle (numpy arrays inside dicts/lists) may reference.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol < 3
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and builtin containers, so a batch file cannot run arbitrary code."""

    def find_class(self, module: str, name: str) -> Any:
        canonical = module.replace("numpy._core", "numpy.core")
        if (canonical, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a CIFAR batch file")
        if canonical.startswith("numpy.core"):  # numpy >= 2 moved numpy.core to numpy._core
            for candidate in (canonical.replace("numpy.core", "numpy._core"), canonical):
                try:
                    return getattr(importlib.import_module(candidate), name)
                except (ImportError, AttributeError):
                    continue
        return super().find_class(module, name)


def load_cifar_pickle(path: str | Path) -> dict[str, Any]:
    """Load one CIFAR pickle file as a dict with ``str`` keys.

    The official files were written by Python 2 with numpy arrays inside, so they must be unpickled with
    ``encoding="latin1"`` (byte strings of Python 2, numpy's raw buffers included, map 1:1 to latin-1 code points).
    Keys come out as ``str`` for those files and as ``bytes`` (``b"data"``) for files pickled by Python 3 with bytes
    keys; both are accepted and normalised to ``str``. Only numpy arrays and builtin containers may be unpickled.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except OSError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ...
        raise DatasetCorruptError(path, f"not a CIFAR python pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DatasetCorruptError(path, f"expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a CIFAR-10 batch file: uint8 images ``(N, 3, 32, 32)`` (RGB) and int64 labels ``(N,)``."""
    batch = load_cifar_pickle(path)
    if "data" not in batch or "labels" not in batch:
        raise DatasetCorruptError(path, f"missing 'data'/'labels' entries (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetCorruptError(path, f"'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DatasetCorruptError(path, f"{data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetCorruptError(path, f"labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (50k train / 10k test, 3x32x32 RGB, 10 classes); random horizontal flips on train by default.

    Reads ``<root>/cifar-10-batches-py/`` with :func:`read_cifar_batch`; when that folder is missing and ``download``
    is allowed, torchvision downloads and extracts the official archive into ``root``. ``image_size`` other than 32
    resizes bilinearly (antialiased).
    """

    name = "CIFAR-10"

    def __init__(self, random_flip: bool = True, **kwargs: Any) -> None:
        """As :class:`~.base.ImageDataModule`, with random flips on by default (as the DDPM paper trains)."""
        super().__init__(random_flip=random_flip, **kwargs)
        self._data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._class_names: list[str] = list(CIFAR10_CLASSES)

    @property
    def channels(self) -> int:
        return 3

    @property
    def num_classes(self) -> int | None:
        return 10

    @property
    def class_names(self) -> list[str] | None:
        return list(self._class_names)

    @property
    def data_dir(self) -> Path:
        return self.root / CIFAR10_DIR

    def _is_available(self) -> bool:
        return all((self.data_dir / name).is_file() for name in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES)

    def _not_found_error(self, reason: str | None = None) -> DatasetNotFoundError:
        root = str(self.root)
        missing = [n for n in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES if not (self.data_dir / n).is_file()]
        py = f"import torchvision; torchvision.datasets.CIFAR10({json.dumps(root)}, download=True)"
        commands = [
            f"python -c {shlex.quote(py)}",
            f"mkdir -p {shlex.quote(root)} && curl -L {CIFAR10_URL} | tar -xz -C {shlex.quote(root)}",
        ]
        hint = f"Missing: {', '.join(missing)}" if missing else None
        return DatasetNotFoundError(self.name, [f"{self.data_dir}/"], commands, reason, hint)

    def _download(self) -> None:
        import torchvision

        torchvision.datasets.CIFAR10(str(self.root), train=True, download=True)

    def _read_split(self, files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [read_cifar_batch(self.data_dir / name) for name in files]
        images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        images = np.require(images, np.uint8, ["C", "W"])  # copies only read-only / non-contiguous arrays
        return torch.from_numpy(images), torch.from_numpy(np.require(labels, np.int64, ["W"]))

    def _load(self) -> None:
        self._data["train"] = self._read_split(CIFAR10_TRAIN_FILES)
        self._data["test"] = self._read_split(CIFAR10_TEST_FILES)
        meta_path = self.data_dir / CIFAR10_META_FILE
        if meta_path.is_file():
            names = load_cifar_pickle(meta_path).get("label_names")
            if isinstance(names, (list, tuple)) and len(names) == 10:
                self._class_names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]

    def _make_dataset(self, split: str) -> Dataset:
        images, labels = self._data[split]
        return TensorImageDataset(images, labels, image_size=self.image_size)
