"""Progressive distillation (Salimans & Ho 2022, Alg. 2): halve the sampling steps of a frozen teacher round by
round; each round's student becomes the next round's teacher."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffusion_lightning.diffusion import ContinuousVPDenoiser, Denoiser, DiscreteVPDenoiser
from diffusion_lightning.diffusion.conditioning import Cond
from diffusion_lightning.diffusion.distillation import distillation_loss
from diffusion_lightning.diffusion.losses import Weighting, loss_weight
from diffusion_lightning.errors import UserError

from .base import DiffusionModel, OptimizerFactory, SchedulerFactory
from .student import StudentModel

log = logging.getLogger(__name__)


def linear_decay_per_round(optimizer: torch.optim.Optimizer, steps_per_round: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate decayed linearly from lr to 0 within every round of ``steps_per_round`` optimizer steps, with
    no warm-up (the paper's ``learning_rate_anneal_type='linear'``)."""
    k = int(steps_per_round)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - (step % k) / k)


def distillation_steps(start_steps: int, end_steps: int, steps_per_round: int) -> int:
    """Optimizer steps of all rounds start_steps -> start_steps / 2 -> ... -> end_steps (``trainer.max_steps``)."""
    return _num_rounds(int(start_steps), int(end_steps)) * int(steps_per_round)


def _num_rounds(start_steps: int, end_steps: int) -> int:
    ratio = start_steps // max(end_steps, 1)
    if end_steps < 1 or start_steps <= end_steps or ratio * end_steps != start_steps or ratio & (ratio - 1):
        raise UserError(f"start_steps / end_steps must be a power of two >= 2, got {start_steps} and {end_steps}")
    return int(math.log2(ratio))


class ProgressiveDistillation(StudentModel):
    """A student distilled from a frozen teacher (any VP model of the framework, through the denoiser contract), its
    sampling steps halved every ``steps_per_round`` optimizer steps from ``start_steps`` (the teacher's) to
    ``end_steps``.

    The student's grid is t = i / N of the teacher's continuous time (a cosine model's t, or t = (k + 1) / T at the
    levels of a discrete one, :class:`~diffusion_lightning.diffusion.schedules.DiscreteTime`); it starts as a copy of
    the teacher's network (fed the same noise conditioning, with ``dropout``) and predicts x0 or v. Each step: i ~
    U{1..N}, two teacher DDIM steps give the target x~, and the loss is w(sigma) ||x0_hat - x~||^2
    (:func:`~diffusion_lightning.diffusion.distillation.distillation_loss`). At a round's end the student is copied
    into the teacher's place, the optimiser's moments are reset and the learning rate restarts
    (:func:`linear_decay_per_round`). The student's step count, which sampling uses and the round follows from, is a
    buffer of the checkpoint, so a run killed mid-round resumes mid-round and a checkpoint samples with its own steps.

    Args:
        teacher: the teacher, a built model (``model.teacher.path``: a checkpoint's EMA weights).
        start_steps, end_steps: the teacher's step count and the last student's (their ratio a power of two).
        steps_per_round: optimizer steps per halving (the paper: 50k on CIFAR-10).
        prediction_type: what the student predicts, ``x0`` (the paper's CIFAR-10 setting) or ``v``.
        weighting: ``truncated_snr`` max(SNR, 1) (the paper) or ``snr+1``.
        dropout: the student's dropout probability (the paper: 0).
        sampler, optimizer, lr_scheduler, channels_last, compile: see :class:`~.base.DiffusionModel`; a sampler
            with ``steps: null`` samples with the student's own step count (the denoiser declares it).
    """

    def __init__(
        self,
        teacher: DiffusionModel | None = None,
        start_steps: int = 256,
        end_steps: int = 1,
        steps_per_round: int = 50000,
        prediction_type: Literal["x0", "v"] = "x0",
        weighting: Weighting = "truncated_snr",
        dropout: float = 0.0,
        sampler: Mapping[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        channels_last: bool | None = None,
        compile: bool | None = None,
    ) -> None:
        if prediction_type not in ("x0", "v"):
            raise UserError(f"the student predicts x0 or v (Salimans & Ho 2022, Sec. 4), got {prediction_type!r}")
        loss_weight(torch.ones(1), weighting)
        super().__init__(teacher, dropout, ("progressive distillation", "pd"),
                         sampler={"steps": None, **(sampler or {})}, optimizer=optimizer,
                         lr_scheduler=lr_scheduler, channels_last=channels_last, compile=compile)  # fmt: skip
        self.save_hyperparameters(ignore=["teacher", "optimizer", "lr_scheduler"])
        self.teacher_net = copy.deepcopy(self.net).eval().requires_grad_(False)  # the teacher from round 1 on
        den = self.teacher.denoiser()
        if isinstance(den, DiscreteVPDenoiser) and 2 * start_steps > den.diffusion.num_timesteps:
            raise UserError(
                f"a teacher with T={den.diffusion.num_timesteps} discrete levels has no distinct levels for the "
                f"{2 * start_steps} half steps of start_steps={start_steps}: set model.start_steps <= "
                f"{den.diffusion.num_timesteps // 2}, or distil a continuous-time teacher (vdiff_*)"
            )
        self.start_steps, self.end_steps = int(start_steps), int(end_steps)
        self.steps_per_round, self.num_rounds = int(steps_per_round), _num_rounds(self.start_steps, self.end_steps)
        self.prediction_type, self.weighting = prediction_type, weighting
        # the checkpoint's state: the round is start_steps / (2 student_steps) in log2 (round 0: start_steps / 2)
        self.register_buffer("student_steps", torch.tensor(self.start_steps // 2))
        self._round = 0  # host copy of the round (set when training starts: no device read per step)

    # ------------------------------------------------------------------ what callers ask
    def denoiser(self) -> ContinuousVPDenoiser:
        """The student, on the teacher's noise levels and continuous time, sampling with its own step count when a
        call gives none."""
        denoiser = self.vp_denoiser(self.net, self.prediction_type)
        denoiser.default_steps = int(self.student_steps)
        return denoiser

    def teacher_denoiser(self) -> Denoiser:
        """This round's teacher: the loaded model in round 0, the previous round's student after."""
        return self.teacher.denoiser() if self._round == 0 else self.vp_denoiser(self.teacher_net, self.prediction_type)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher, self.teacher_net]

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._round = self.round_of(int(self.student_steps))  # after a checkpoint has restored it
        total = distillation_steps(self.start_steps, self.end_steps, self.steps_per_round)
        if not 0 < self.trainer.max_steps <= total:
            raise UserError(f"{self.num_rounds} rounds of {self.steps_per_round} steps need trainer.max_steps={total} "
                            f"(got {self.trainer.max_steps}; fewer stop in an earlier round)")
        self._log_round()  # the round training starts in (round 1, or the one a resume is in)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if (r := self.global_step // self.steps_per_round) > self._round and r < self.num_rounds:
            self.next_round(r)

    def round_of(self, student_steps: int) -> int:
        """The round whose student samples with ``student_steps`` (0 for start_steps / 2)."""
        return int(math.log2(self.start_steps // student_steps)) - 1

    def next_round(self, r: int) -> None:
        """The student of round r - 1 becomes the teacher; the optimiser's moments start afresh."""
        self.teacher_net.load_state_dict(self.net.state_dict())
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        self._round = r
        self.student_steps.fill_(self.start_steps >> (r + 1))
        self._log_round()

    def _log_round(self) -> None:
        r = self._round
        log.info(f"progressive distillation round {r + 1}/{self.num_rounds}: {self.start_steps >> r} teacher steps -> "
                 f"{self.start_steps >> (r + 1)} student steps")

    def loss(self, x0: Tensor, cond: Cond) -> Tensor:
        """Per-sample w(sigma) ||x0_hat - x~||^2 against two of this round's teacher DDIM steps (Alg. 2)."""
        n = self.start_steps >> (self._round + 1)
        return distillation_loss(self.denoiser(), self.teacher_denoiser(), x0, self.time, n, cond, self.weighting)

    def step_values(self) -> dict[str, float]:
        return {"student_steps": float(self.start_steps >> (self._round + 1))}  # names the round-end checkpoints
