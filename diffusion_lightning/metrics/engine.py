"""torchmetrics FID / KID / IS on this package's feature extractors (the in-training engine; no Lightning).

The real side comes from a cached :class:`ReferenceStats` (the file ``evaluate.py`` uses), so the numbers equal
``python -m diffusion_lightning.evaluate``'s for the same images; see ``callbacks/metrics.py`` for the DDP design.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from .features import FeatureExtractor, extract_features
from .reference import ReferenceStats


class _SharedExtraction:
    """Runs the extractor once per image tensor for all metrics (keyed on the tensor object, held until cleared)."""

    def __init__(self, extractor: FeatureExtractor, batch_size: int) -> None:
        self.extractor, self.batch_size = extractor, batch_size
        self._images: Tensor | None = None
        self._out: dict[str, Tensor | None] = {}

    def __call__(self, images: Tensor) -> dict[str, Tensor | None]:
        if images is not self._images:
            chunks = (images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size))
            self._out = extract_features(self.extractor, chunks)
            self._images = images
        return self._out

    def clear(self) -> None:
        self._images, self._out = None, {}


class ExtractorFeatures(nn.Module):
    """A :class:`FeatureExtractor` output (``features`` or ``logits``) as a torchmetrics ``feature`` module.

    uint8 images (B, C, H, W) -> (B, D) float64 on this module's device (moved along with the metric).
    """

    def __init__(self, extraction: _SharedExtraction, output: str = "features") -> None:
        super().__init__()
        extractor = extraction.extractor
        if output == "logits":
            extractor.require_logits()
        elif output != "features":
            raise ValueError(f"output must be 'features' or 'logits', got {output!r}")
        self.extraction, self.output = extraction, output
        self.num_features = extractor.feature_dim if output == "features" else int(extractor.num_classes)
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # follows metric.to(device)

    def forward(self, images: Tensor) -> Tensor:
        out = self.extraction(images)[self.output]
        assert out is not None
        return out.to(self._anchor.device)


class SampleQuality(nn.Module):
    """torchmetrics FID, KID and (with logits) IS on one extractor, the real side from a :class:`ReferenceStats`.

    Usage, on every rank: :meth:`set_reference` (the stats on global rank 0, None elsewhere), :meth:`update` with
    uint8 samples (once per evaluation), :meth:`compute` (a collective under DDP), :meth:`reset`.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        is_splits: int = 10,
        batch_size: int = 250,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.extraction = _SharedExtraction(extractor, batch_size)
        with warnings.catch_warnings():  # KID/IS warn that they keep all features: intended, the sets are small
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
            self.fid = FrechetInceptionDistance(
                feature=ExtractorFeatures(self.extraction), reset_real_features=False, normalize=False
            )
            self.kid = KernelInceptionDistance(
                feature=ExtractorFeatures(self.extraction), subsets=kid_subsets, subset_size=kid_subset_size,
                reset_real_features=False,
            )  # fmt: skip
            self.inception_score = (
                InceptionScore(feature=ExtractorFeatures(self.extraction, "logits"), splits=is_splits)
                if extractor.has_logits
                else None
            )
        self.has_reference = False
        self._hits = self._labelled = 0  # class accuracy of labelled samples, from the same logits

    def set_reference(self, ref: ReferenceStats | None) -> None:
        """Load the real side: the reference statistics on exactly one rank, ``None`` on the others."""
        device = self.fid.real_features_sum.device
        if ref is not None:
            if ref.features is None:
                raise ValueError("KID needs the reference features: load the stats with keep_features=True")
            n = ref.num_images
            mu = ref.mu.to(device, torch.float64)
            # The inverse of FrechetInceptionDistance.compute(): it recovers mu and Sigma from these sums.
            self.fid.real_features_sum = n * mu
            self.fid.real_features_cov_sum = (n - 1) * ref.sigma.to(device, torch.float64) + n * torch.outer(mu, mu)
            self.fid.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)
            real = ref.features.to(device, torch.float64)
        else:
            real = torch.empty(0, self.extractor.feature_dim, dtype=torch.float64, device=device)
        self.kid.real_features.append(real)
        self.has_reference = True

    def update(self, images: Tensor, labels: Tensor | None = None) -> None:
        """Add generated uint8 images (B, C, H, W); features are extracted once for all metrics. With the class
        ``labels`` the samples were drawn for, and an extractor with logits, also their ``class_accuracy`` (this
        process's samples: the share the extractor's classifier assigns to their label)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images (quantise with to_uint8), got {images.dtype}")
        self.fid.update(images, real=False)
        self.kid.update(images, real=False)
        if self.inception_score is not None:
            self.inception_score.update(images)
        if labels is not None and self.extractor.has_logits:
            logits = self.extraction(images)["logits"]  # the logits IS used: no second extraction
            self._hits += int((logits.argmax(1).cpu() == labels.cpu()).sum())
            self._labelled += len(labels)
        self.extraction.clear()

    def compute(self, seed: int = 0) -> dict[str, float]:
        """``fid``, ``kid``, ``kid_std`` and, with logits, ``is``, ``is_std`` from the states of all ranks.

        Must run on every rank (torchmetrics gathers the states here). The random KID subsets and IS shuffle are
        drawn from torch's global generator under ``fork_rng`` seeded with ``seed``.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            values = {"fid": self.fid.compute()}
            values["kid"], values["kid_std"] = self.kid.compute()
            if self.inception_score is not None:
                values["is"], values["is_std"] = self.inception_score.compute()
        if self._labelled:
            values["class_accuracy"] = self._hits / self._labelled
        return {k: float(v) for k, v in values.items()}

    def reset(self) -> None:
        """Drop the generated side; the reference stays."""
        self.fid.reset()
        self.kid.reset()
        if self.inception_score is not None:
            self.inception_score.reset()
        self._hits = self._labelled = 0
        self.extraction.clear()
