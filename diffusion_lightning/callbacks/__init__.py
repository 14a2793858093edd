"""Callbacks shared by every model: EMA, sample grids, metrics."""

from .ema import EMA, ema_module
from .sample_grid import SampleGrid

__all__ = ["EMA", "SampleGrid", "ema_module"]
