"""FID / KID / IS of samples during training, computed with torchmetrics on this package's feature extractors.

Design (why the numbers are those of ``python -m diffusion_lightning.evaluate`` for the same images):

* Features come from :func:`diffusion_lightning.metrics.get_extractor` (``inception``, ``fmnist-classifier``), wrapped
  as torchmetrics ``feature`` modules (:class:`ExtractorFeatures`): uint8 (B, C, H, W) in, (B, D) float64 out on the
  metric's device, ``num_features`` set so torchmetrics does not probe the network with a dummy image. The three
  metrics share one extraction per batch.
* The real side is not re-extracted: it is the reference of :func:`~diffusion_lightning.metrics.
  load_or_compute_reference_stats` -- the very cache file ``evaluate.py`` reads and writes (same data set name, split,
  extractor, resolution and ``reference_images``). Its float64 mean and covariance are written into
  ``FrechetInceptionDistance``'s real-feature sums (n mu, (n - 1) Sigma + n mu mu^T, n) on global rank 0 only; the
  other ranks keep zeros, so the sum over ranks that torchmetrics takes when it synchronises is the reference itself.
  KID gets the cached (N, D) features (float32, as evaluate.py uses them) on rank 0 and an empty (0, D) tensor
  elsewhere. ``reset_real_features=False`` keeps them across evaluations; they are set up at the first evaluation.
* Samples are drawn with the EMA weights (:func:`ema_module`), split across DDP ranks (rank r draws its share from the
  generator seeded ``seed + r + world_size * global_step``: distinct on every rank and at every evaluation, identical
  on a rerun), quantised with :func:`~diffusion_lightning.metrics.to_uint8` (bit-identical to the saved PNGs) and
  added in one ``update`` per rank, so every rank holds the same number of list-state entries for the gather.
* ``compute()`` runs on every rank (it synchronises the states: a collective), then each rank logs the same value
  with ``sync_dist=False``. KID's subsets and IS's shuffle use torch's global RNG: they run under ``fork_rng`` seeded
  per evaluation, so training's random stream is untouched. KID draws its subsets in a different order than
  evaluate.py (equal values when ``kid_subset_size`` covers both sets); IS follows torchmetrics (shuffled splits,
  unbiased std), evaluate.py torch-fidelity (consecutive splits).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from diffusion_lightning.metrics import FeatureExtractor, ReferenceStats, get_extractor, load_or_compute_reference_stats
from diffusion_lightning.metrics.engine import SampleQuality
from diffusion_lightning.metrics.reference import dataset_key
from diffusion_lightning.utils import generate

from .ema import ema_module


def reference_stats(
    datamodule: Any,
    extractor: FeatureExtractor,
    split: str,
    resolution: int,
    num_images: int | None,
    cache_dir: str | Path | None = None,
) -> ReferenceStats:
    """The cached reference of ``evaluate.py`` for this data module (same cache key), with features for KID."""
    return load_or_compute_reference_stats(
        datamodule.dataset(split), extractor, dataset=dataset_key(datamodule),
        split=split, resolution=resolution, num_images=num_images, cache_dir=cache_dir, keep_features=True,
        progress=True,
    )  # fmt: skip


def rank_share(num_samples: int, rank: int, world_size: int) -> int:
    """How many of ``num_samples`` rank ``rank`` draws (the first ``num_samples % world_size`` ranks one more)."""
    return num_samples // world_size + (rank < num_samples % world_size)


class SampleMetrics(L.Callback):
    """Every ``every_n_epochs`` epochs and/or ``every_n_steps`` optimizer steps, log FID, KID (and IS where the
    extractor has logits) of ``num_samples`` samples as ``<prefix>fid``, ``<prefix>kid``, ``<prefix>kid_std``,
    ``<prefix>is``, ``<prefix>is_std``. See the module docstring for the reference, seeding and DDP behaviour.

    Args:
        every_n_epochs: evaluate at the end of every n-th training epoch (0: never).
        every_n_steps: evaluate after every n-th optimizer step (0: never).
        num_samples: generated images per evaluation, in total over all ranks.
        batch_size: sampling and feature-extraction batch size per rank.
        seed: base seed of the sampling noise.
        use_ema: sample with the EMA weights (the raw weights if False or no EMA callback is active).
        sampler: a ``conf/sampler`` entry for ``module.sample``; None: the model's own.
        extractor, extractor_kwargs: the feature extractor (:func:`~diffusion_lightning.metrics.get_extractor`).
        reference_split, reference_images, reference_dir: the reference statistics (the first ``reference_images``
            images of the data module's split, all if None; cached in ``reference_dir``, default as evaluate.py).
        kid_subset_size, kid_subsets: KID subsets (the size is capped at the sample and reference counts).
        is_splits: IS splits (capped at ``num_samples``).
        prefix: prefix of the logged names.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        every_n_steps: int = 0,
        num_samples: int = 5000,
        batch_size: int = 250,
        seed: int = 0,
        use_ema: bool = True,
        sampler: Mapping[str, Any] | None = None,
        extractor: str = "inception",
        extractor_kwargs: Mapping[str, Any] | None = None,
        reference_split: str = "train",
        reference_images: int | None = None,
        reference_dir: str | None = None,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        is_splits: int = 10,
        prefix: str = "metrics/",
    ) -> None:
        if every_n_epochs < 0 or every_n_steps < 0:
            raise ValueError("every_n_epochs and every_n_steps must be >= 0")
        if num_samples < 2:
            raise ValueError(f"num_samples must be at least 2, got {num_samples}")
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.num_samples, self.batch_size, self.seed, self.use_ema = num_samples, batch_size, seed, use_ema
        self.sampler = dict(sampler) if sampler is not None else None
        self.extractor_name, self.extractor_kwargs = extractor, dict(extractor_kwargs or {})
        self.reference_split, self.reference_images = reference_split, reference_images
        self.reference_dir = reference_dir
        self.kid_subset_size, self.kid_subsets, self.is_splits = kid_subset_size, kid_subsets, is_splits
        self.prefix = prefix
        self.quality: SampleQuality | None = None
        self.last_metrics: dict[str, float] = {}
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Build the extractor (missing weights fail here, before training) and the metrics on the root device."""
        if stage != "fit" or self.quality is not None:
            return
        if trainer.world_size > self.num_samples:
            raise ValueError(f"num_samples={self.num_samples} is fewer than the {trainer.world_size} ranks")
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "dataset"):
            raise ValueError("SampleMetrics needs a data module with dataset(split) for its reference statistics")
        if self.every_n_steps and trainer.log_every_n_steps and self.every_n_steps % trainer.log_every_n_steps:
            rank_zero_warn(  # Lightning sends step-level values to the loggers only every log_every_n_steps
                f"SampleMetrics(every_n_steps={self.every_n_steps}) is not a multiple of the trainer's "
                f"log_every_n_steps={trainer.log_every_n_steps}: the loggers will miss those values"
            )
        device = trainer.strategy.root_device
        extractor = get_extractor(self.extractor_name, device=device, **self.extractor_kwargs)
        num_ref = len(datamodule.dataset(self.reference_split))
        if self.reference_images is not None:
            num_ref = min(num_ref, int(self.reference_images))
        self.quality = SampleQuality(
            extractor, kid_subset_size=min(self.kid_subset_size, self.num_samples, num_ref),
            kid_subsets=self.kid_subsets, is_splits=min(self.is_splits, self.num_samples), batch_size=self.batch_size,
        ).to(device)  # fmt: skip

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_due = self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if epoch_due and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Sample this rank's share, compute the metrics over all ranks and log them. Call on every rank."""
        assert self.quality is not None, "setup() has not run"
        start = time.perf_counter()
        step, rank, world = trainer.global_step, trainer.global_rank, trainer.world_size
        self._last_step = step
        if not self.quality.has_reference:  # the first evaluation; only rank 0 loads (or computes) the reference
            ref = None
            if rank == 0:
                ref = reference_stats(
                    trainer.datamodule, self.quality.extractor, self.reference_split, pl_module.image_shape[-1],
                    self.reference_images, self.reference_dir,
                )  # fmt: skip
            self.quality.set_reference(ref)
        module = ema_module(trainer, pl_module) if self.use_ema else pl_module
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # leaves training's random stream as it was
            generator = torch.Generator().manual_seed(self.seed + rank + world * step)
            share = rank_share(self.num_samples, rank, world)
            images, _ = generate(module, share, self.batch_size, generator, self.sampler, uint8=True)
        self.quality.update(images)
        values = self.quality.compute(seed=self.seed + step)  # every rank: the states are gathered here
        self.quality.reset()
        for name, value in values.items():
            pl_module.log(f"{self.prefix}{name}", value, sync_dist=False, batch_size=1)
        self.last_metrics = values
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        rank_zero_info(f"step {step}: {shown} ({self.num_samples} samples, {time.perf_counter() - start:.1f} s)")
        return values
