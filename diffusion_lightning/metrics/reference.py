"""Reference statistics of a real data set (mu, sigma in float64 and the image count), cached on disk.

The data set yields images in [-1, 1] (tensors, or ``(image, label)`` tuples, as the data modules do); they are
quantised with :func:`~diffusion_lightning.images.to_uint8` -- exactly like generated samples -- before
feature extraction. The cache is a ``.pt`` of tensors only (loaded with ``weights_only=True``) named after
(dataset, split, extractor, resolution, number of images).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..images import to_uint8
from .features import FeatureExtractor, extract_features
from .frechet import feature_statistics

#: Environment variable overriding the cache directory (default ``<repo>/data/reference_stats``).
REFERENCE_DIR_ENV_VAR = "DIFFUSION_LIGHTNING_REFERENCE_STATS"


@dataclass
class ReferenceStats:
    """Feature mean (D,), covariance (D, D) (float64), image count and, optionally, the raw features (for KID)."""

    mu: Tensor
    sigma: Tensor
    num_images: int
    features: Tensor | None = None

    def to_tensors(self) -> dict[str, Tensor]:
        out = {"mu": self.mu, "sigma": self.sigma, "num_images": torch.tensor(self.num_images, dtype=torch.long)}
        if self.features is not None:
            out["features"] = self.features
        return out

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor]) -> ReferenceStats:
        return cls(d["mu"], d["sigma"], int(d["num_images"]), d.get("features"))


def default_reference_dir() -> Path:
    env = os.environ.get(REFERENCE_DIR_ENV_VAR)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "reference_stats"


def dataset_key(datamodule: object) -> str:
    """The cache name of a DataModule's data: its class name without ``DataModule`` and, for data that lives in
    a user's folder (``ImageFolder``), a short hash of the folders, so two image folders never share a cache file."""
    name = type(datamodule).__name__.removesuffix("DataModule")
    folders = getattr(datamodule, "train_dir", None), getattr(datamodule, "test_dir", None)
    if any(folders):
        name += "-" + hashlib.sha1(repr(tuple(map(str, folders))).encode()).hexdigest()[:10]
    return name


def reference_cache_path(
    cache_dir: str | Path, dataset: str, split: str, extractor: str, resolution: int, num_images: int
) -> Path:
    """``<cache_dir>/<dataset>-<split>-<extractor>-<resolution>px-n<num_images>.pt`` (names sanitised)."""
    parts = [re.sub(r"[^A-Za-z0-9_.-]+", "_", str(p)).strip("_") for p in (dataset, split, extractor)]
    return Path(cache_dir) / f"{'-'.join(parts)}-{resolution}px-n{num_images}.pt"


def _uint8_batches(data: Dataset | DataLoader | Iterable, batch_size: int, resolution: int | None) -> Iterator[Tensor]:
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in data:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if resolution is not None and tuple(images.shape[-2:]) != (resolution, resolution):
            raise ValueError(f"expected {resolution}x{resolution} images, got {tuple(images.shape[-2:])}")
        yield to_uint8(images)


def compute_reference_stats(
    data: Dataset | DataLoader | Iterable,
    extractor: FeatureExtractor,
    *,
    max_images: int | None = None,
    batch_size: int = 250,
    resolution: int | None = None,
    keep_features: bool = False,
    progress: bool = False,
) -> ReferenceStats:
    """Statistics of the first ``max_images`` images (all if None) of ``data`` in iteration order (no shuffling).

    ``data`` is a map-style Dataset (batched here with ``batch_size``) or any iterable of batches.
    ``keep_features`` also stores the (N, D) features as float32 (needed for KID).
    """
    out = extract_features(extractor, _uint8_batches(data, batch_size, resolution), max_images, progress)
    features = out["features"]
    assert features is not None
    mu, sigma = feature_statistics(features)
    return ReferenceStats(mu, sigma, len(features), features.float() if keep_features else None)


def load_or_compute_reference_stats(
    data: Dataset | DataLoader | Iterable,
    extractor: FeatureExtractor,
    *,
    dataset: str,
    split: str,
    resolution: int,
    num_images: int | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 250,
    keep_features: bool = False,
    recompute: bool = False,
    progress: bool = False,
) -> ReferenceStats:
    """:func:`compute_reference_stats`, cached under :func:`reference_cache_path`.

    ``num_images`` None means all of ``data`` (its ``len`` for a Dataset, needed for the cache key). A cached file
    without features is recomputed when ``keep_features`` asks for them.
    """
    if num_images is None:
        if not isinstance(data, Dataset) or not hasattr(data, "__len__"):
            raise ValueError("num_images is needed for the cache key unless data is a sized Dataset")
        num_images = len(data)  # type: ignore[arg-type]
    path = reference_cache_path(cache_dir or default_reference_dir(), dataset, split, extractor.cache_key, resolution,
                                num_images)  # fmt: skip
    if path.is_file() and not recompute:
        stats = ReferenceStats.from_tensors(torch.load(path, map_location="cpu", weights_only=True))
        if stats.features is not None or not keep_features:
            return stats
    stats = compute_reference_stats(
        data, extractor, max_images=num_images, batch_size=batch_size, resolution=resolution,
        keep_features=keep_features, progress=progress,
    )  # fmt: skip
    if stats.num_images != num_images:
        raise ValueError(f"asked for {num_images} images but the data set yielded {stats.num_images}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(stats.to_tensors(), tmp)
    tmp.replace(path)  # atomic: concurrent runs never read a half-written file
    return stats
