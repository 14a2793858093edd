"""Callbacks shared by every model: EMA, sample grids, metrics."""

from .checkpoint import ModelCheckpoint
from .ema import EMA, ema_module
from .metrics import SampleMetrics
from .progress import PlainProgress, ProgressBar, progress_bar
from .reconstruction_grid import ReconstructionGrid
from .requeue import Requeue
from .sample_grid import SampleGrid

__all__ = [
    "EMA",
    "ModelCheckpoint",
    "PlainProgress",
    "ProgressBar",
    "ReconstructionGrid",
    "Requeue",
    "SampleGrid",
    "SampleMetrics",
    "ema_module",
    "progress_bar",
]
