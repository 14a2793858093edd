"""Consistency training from scratch: CT (Song et al. 2023, Alg. 3) and improved CT (Song & Dhariwal 2023)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffusion_lightning.diffusion import EDMPrecond
from diffusion_lightning.diffusion.conditioning import Cond
from diffusion_lightning.diffusion.consistency import (
    ConsistencyFunction,
    Distance,
    consistency_loss,
    ct_num_levels,
    ct_target_decay,
    ema_update,
    ict_num_levels,
    karras_levels,
    lognormal_level_probs,
)
from diffusion_lightning.diffusion.denoisers import append_dims
from diffusion_lightning.errors import UserError

from .base import DiffusionModel


class ConsistencyTraining(DiffusionModel):
    """A consistency model trained from data alone: f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with the
    sigma_min offset (:class:`~diffusion_lightning.diffusion.EDMPrecond`, ``boundary_condition=True``).

    Step k: N(k) Karras levels sigma_1 < ... < sigma_N, a pair (sigma_i, sigma_{i+1}) drawn uniformly (CT) or from the
    discretised lognormal (iCT), one noise z for both points x0 + sigma z, and the loss lambda(sigma_i)
    d(f(x0 + sigma_{i+1} z, sigma_{i+1}), sg f^-(x0 + sigma_i z, sigma_i)) with f^- the target network: an EMA with
    decay mu(k) (CT), or the same weights (iCT, ``mu0: 0``) evaluated with the same dropout mask.

    Args:
        net: the network F, called as ``net(c_in x, 250 ln sigma, y)``.
        curriculum: ``ct`` (N(k) of Song et al. 2023) or ``ict`` (the doubling curriculum of Song & Dhariwal).
        total_steps: K, the training steps the curricula are laid over (``trainer.max_steps``).
        s0, s1: the curriculum's initial and final level counts (CT: 2, 150; iCT: 10, 1280).
        mu0: CT's target decay mu0 (mu(k) = exp(s0 ln mu0 / N(k))); 0: no target network (iCT).
        level_sampling: ``uniform`` over the pairs (CT) or ``lognormal`` (iCT, with ``p_mean``, ``p_std``).
        weighting: ``uniform`` (CT) or ``inverse_gap`` 1 / (sigma_{i+1} - sigma_i) (iCT).
        distance, huber_c: ``l2``, ``l1``, ``pseudo_huber`` (iCT) with c (None: 0.00054 sqrt(d)), or ``lpips`` (CT's
            best) with ``lpips`` = local weight files (:class:`~diffusion_lightning.nets.lpips.LPIPS`).
        sigma_data, sigma_min, sigma_max, rho: the parameterisation and its Karras levels (0.5, 0.002, 80, 7).
        mid_sigmas: the intermediate levels of multistep sampling (2 steps: [sigma_max, mid_sigmas[0]]).
        **kwargs: the :class:`~.base.DiffusionModel` arguments (sampler, optimiser, speed options).
    """

    def __init__(
        self,
        net: nn.Module,
        curriculum: Literal["ct", "ict"] = "ict",
        total_steps: int = 400000,
        s0: int = 10,
        s1: int = 1280,
        mu0: float = 0.0,
        level_sampling: Literal["uniform", "lognormal"] = "lognormal",
        p_mean: float = -1.1,
        p_std: float = 2.0,
        weighting: Literal["uniform", "inverse_gap"] = "inverse_gap",
        distance: Distance = "pseudo_huber",
        huber_c: float | None = None,
        lpips: Mapping[str, str] | None = None,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        mid_sigmas: Sequence[float] = (0.821,),
        **kwargs: Any,
    ) -> None:
        super().__init__(net, **{"sampler": {"name": "consistency", "steps": 1}, **kwargs})
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler", "first_stage", "conditioner"])
        if net.out_channels != net.in_channels:
            raise UserError(f"set model.net.out_channels={net.in_channels} (got {net.out_channels})")
        if curriculum not in ("ct", "ict") or level_sampling not in ("uniform", "lognormal"):
            raise UserError(f"curriculum is ct or ict and level_sampling uniform or lognormal, got {curriculum!r} and "
                            f"{level_sampling!r}")  # fmt: skip
        if weighting not in ("uniform", "inverse_gap"):
            raise UserError(f"weighting is uniform or inverse_gap, got {weighting!r}")
        if not 0.0 <= mu0 < 1.0:
            raise UserError(f"mu0 is a decay in [0, 1), got {mu0}")
        self.distance = DistanceChoice(distance, lpips)
        self.curriculum, self.total_steps, self.s0, self.s1, self.mu0 = curriculum, int(total_steps), s0, s1, mu0
        self.level_sampling, self.p_mean, self.p_std, self.weighting = level_sampling, p_mean, p_std, weighting
        self.huber_c = huber_c
        self.sigma_data, self.sigma_min, self.sigma_max, self.rho = sigma_data, sigma_min, sigma_max, rho
        self.mid_sigmas = tuple(mid_sigmas)
        # CT's target network theta^- (an EMA of the weights); iCT uses the weights themselves
        self.target_net = copy.deepcopy(net).requires_grad_(False) if mu0 > 0 else None
        self._levels: tuple[int, Tensor, Tensor | None] | None = None  # the current N's levels (see levels)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond = None) -> Tensor:
        return self.network(x, c_noise, cond)

    def consistency_function(self, net: nn.Module | None = None) -> ConsistencyFunction:
        """f_theta (or f over ``net``, the target network) as a denoiser: Song et al.'s c_skip, c_out."""
        fn = self if net is None else net
        precond = EDMPrecond(fn, self.sigma_data, self.sigma_min, self.sigma_max, boundary_condition=True)
        return ConsistencyFunction(precond, self.sigma_min, self.sigma_max, self.mid_sigmas, enforce=False)

    def denoiser(self) -> ConsistencyFunction:
        return self.consistency_function()

    def num_levels(self, k: int) -> int:
        """N(k) of the curriculum at training step k."""
        if self.curriculum == "ct":
            return ct_num_levels(k, self.total_steps, self.s0, self.s1)
        return ict_num_levels(k, self.total_steps, self.s0, self.s1)

    def target_decay(self, k: int) -> float:
        """mu(k) of CT's target network (0 without one)."""
        return ct_target_decay(k, self.total_steps, self.s0, self.s1, self.mu0) if self.mu0 > 0 else 0.0

    def levels(self, k: int) -> tuple[Tensor, Tensor | None]:
        """The N(k) Karras levels of step k and, for lognormal sampling, the probabilities of their pairs (made again
        only when N changes)."""
        n = self.num_levels(k)
        if self._levels is None or self._levels[0] != n:
            sigmas = karras_levels(n, self.sigma_min, self.sigma_max, self.rho)
            lognormal = self.level_sampling == "lognormal"
            probs = lognormal_level_probs(sigmas, self.p_mean, self.p_std) if lognormal else None
            self._levels = (n, sigmas, probs)
        return self._levels[1], self._levels[2]

    def level_pairs(self, batch: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(sigma_i, sigma_{i+1}) for ``batch`` samples at step k, drawn from the curriculum's levels."""
        sigmas, probs = self.levels(k)
        if probs is not None:
            i = torch.multinomial(probs, batch, replacement=True)
        else:
            i = torch.randint(0, len(sigmas) - 1, (batch,))
        return sigmas[i].to(device), sigmas[i + 1].to(device)

    def loss(self, x0: Tensor, cond: Cond) -> Tensor:
        """Per-sample lambda(sigma_i) d(f(x_{i+1}, sigma_{i+1}), sg f^-(x_i, sigma_i)), one z for both points."""
        lo, hi = self.level_pairs(x0.shape[0], self.global_step, x0.device)
        z = torch.randn_like(x0)
        lo_, hi_ = lo.to(x0.dtype), hi.to(x0.dtype)
        x_hi, x_lo = x0 + append_dims(hi_, x0.ndim) * z, x0 + append_dims(lo_, x0.ndim) * z
        f_target = self.consistency_function(self.target_net)
        d = consistency_loss(self.denoiser(), f_target, x_hi, hi_, x_lo, lo_, x0, cond, self.distance.kind,
                             self.huber_c,
                             perceptual=self.distance.network(x0.device))  # fmt: skip
        weight = (hi - lo).reciprocal() if self.weighting == "inverse_gap" else torch.ones_like(hi)
        return weight.float() * d.float()

    def step_values(self) -> dict[str, float]:
        return {"train/num_levels": float(self.num_levels(self.global_step))}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.target_net is not None:  # after the optimizer step of step k: theta^- <- mu(k) theta^- + ...
            ema_update(self.target_net, self.net, self.target_decay(self.global_step - 1))


class DistanceChoice:
    """A distance by name (:func:`~diffusion_lightning.diffusion.consistency.distance`); for ``lpips`` the LPIPS
    network from local weight files (never downloaded: without them the error says how to get them), held outside the
    module tree, so checkpoints neither hold nor need it, and moved to the data's device when used."""

    def __init__(self, kind: str, lpips: Mapping[str, str] | None = None) -> None:
        if kind not in ("l2", "l1", "pseudo_huber", "lpips"):
            raise UserError(f"unknown distance {kind!r}: use pseudo_huber, l2, l1 or lpips")
        self.kind: Distance = kind  # type: ignore[assignment]
        self._network: nn.Module | None = None
        if kind == "lpips":
            if not lpips:
                raise UserError("model.distance=lpips needs local LPIPS weights (no package here ships them and "
                                "nothing is downloaded at run time): set model.lpips={backbone_weights: "
                                "<vgg16-397923af.pth>, lin_weights: <lpips vgg.pth>}, or use "
                                "model.distance=pseudo_huber (iCT's)")  # fmt: skip
            from diffusion_lightning.nets.lpips import LPIPS

            self._network = LPIPS(**lpips).requires_grad_(False)

    def network(self, device: torch.device) -> nn.Module | None:
        """The LPIPS network on ``device`` (None for the other distances)."""
        if self._network is not None:
            self._network = self._network.to(device)
        return self._network
