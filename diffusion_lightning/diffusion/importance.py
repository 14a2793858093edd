"""Timestep samplers for training: uniform, and iDDPM's importance sampling of L_vlb.

A sampler draws t with probabilities p_t and returns weights 1 / (T p_t); multiplying the
per-sample loss by them keeps E[weight * T * L_t] = sum_t L_t (Nichol & Dhariwal 2021, eq. 18).
State is plain tensors and ints, so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class UniformSampler:
    """t ~ U{0, ..., T-1}; every weight is 1."""

    def __init__(self, num_timesteps: int):
        if num_timesteps < 1:
            raise ValueError("num_timesteps must be positive")
        self.num_timesteps = int(num_timesteps)

    def probabilities(self) -> Tensor:
        """p_t as a float64 CPU tensor of shape (T,)."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``batch_size`` timesteps (long) and their weights 1 / (T p_t) (float32) on ``device``.
        ``generator`` must be a CPU generator: drawing happens on the CPU."""
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-sample losses of the drawn timesteps (no-op for the uniform sampler)."""

    def state_dict(self) -> dict[str, Any]:
        return {"num_timesteps": self.num_timesteps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_timesteps"]) != self.num_timesteps:
            raise ValueError(f"state is for T={int(state['num_timesteps'])}, sampler has T={self.num_timesteps}")


class LossSecondMomentResampler(UniformSampler):
    """iDDPM eq. 18: p_t proportional to sqrt(E[L_t^2]), from the last ``history_per_term`` losses of
    each term, mixed with a uniform share: p <- (1 - u) p + u / T (u = 0.001 as in the reference code).
    Uniform until every term has a full history (the paper's warm-up of 10 values per t).

    ``update`` expects the losses of the whole global batch: under DDP, gather t and losses from
    all ranks first, so that every rank holds the same history and draws from the same p.
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self.history = torch.zeros(self.num_timesteps, self.history_per_term, dtype=torch.float64)
        self.counts = torch.zeros(self.num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history_per_term).all())

    def probabilities(self) -> Tensor:
        if not self.warmed_up():
            return super().probabilities()
        p = self.history.pow(2).mean(dim=1).sqrt()
        p = p / p.sum()
        return p * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Append each (t, L_t) pair to term t's history, dropping its oldest value when full."""
        ts = torch.as_tensor(t).detach().reshape(-1).long().cpu().tolist()
        values = torch.as_tensor(losses).detach().reshape(-1).to(device="cpu", dtype=torch.float64).tolist()
        if len(ts) != len(values):
            raise ValueError("t and losses must have the same number of elements")
        for ti, loss in zip(ts, values, strict=True):
            n = int(self.counts[ti])
            if n == self.history_per_term:
                self.history[ti, :-1] = self.history[ti, 1:].clone()
                self.history[ti, -1] = loss
            else:
                self.history[ti, n] = loss
                self.counts[ti] = n + 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_timesteps": self.num_timesteps,
            "history_per_term": self.history_per_term,
            "history": self.history.clone(),
            "counts": self.counts.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if int(state["history_per_term"]) != self.history_per_term:
            raise ValueError("state has a different history_per_term")
        self.history = state["history"].to(dtype=torch.float64, device="cpu").clone()
        self.counts = state["counts"].to(dtype=torch.long, device="cpu").clone()
