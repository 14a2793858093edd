"""Sample-quality metrics (FID, KID, IS) on pluggable feature extractors; pure torch, no Lightning."""

from ..images import from_uint8, to_uint8
from .engine import ExtractorFeatures, SampleQuality
from .features import (
    EXTRACTORS,
    FashionMNISTClassifierExtractor,
    FeatureExtractor,
    InceptionExtractor,
    extract_features,
    get_extractor,
    register_extractor,
)
from .frechet import (
    LogitsUnavailableError,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    polynomial_mmd2,
)
from .reference import ReferenceStats, compute_reference_stats, load_or_compute_reference_stats

__all__ = [
    "EXTRACTORS",
    "ExtractorFeatures",
    "FashionMNISTClassifierExtractor",
    "FeatureExtractor",
    "InceptionExtractor",
    "LogitsUnavailableError",
    "ReferenceStats",
    "SampleQuality",
    "compute_reference_stats",
    "extract_features",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "from_uint8",
    "get_extractor",
    "inception_score",
    "kernel_inception_distance",
    "load_or_compute_reference_stats",
    "polynomial_mmd2",
    "register_extractor",
    "to_uint8",
]
