"""Callbacks shared by every model: EMA, sample grids, metrics."""

from .checkpoint import ModelCheckpoint
from .ema import EMA, ema_module
from .metrics import ExtractorFeatures, SampleMetrics, SampleQuality
from .sample_grid import SampleGrid

__all__ = ["EMA", "ExtractorFeatures", "ModelCheckpoint", "SampleGrid", "SampleMetrics", "SampleQuality", "ema_module"]
