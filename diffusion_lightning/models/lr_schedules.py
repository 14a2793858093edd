"""Learning-rate schedules the recipes' configs name as ``_partial_`` targets."""

from __future__ import annotations

import torch


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate ramped linearly from lr / warmup_steps to lr over the first ``warmup_steps`` optimizer
    steps, then constant (DDPM: 5000 steps)."""
    warmup = max(int(warmup_steps), 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
