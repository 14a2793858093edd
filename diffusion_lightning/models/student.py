"""What the recipes that start from a trained diffusion model share (progressive distillation, consistency
distillation and tuning): the frozen teacher from a framework checkpoint, a student network copied from it, and the
student presented through the denoiser contract on the teacher's own noise conditioning."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from torch import Tensor, nn

from diffusion_lightning.diffusion import ContinuousVPDenoiser, Denoiser, DiscreteVPDenoiser
from diffusion_lightning.diffusion.gaussian import PredictionType
from diffusion_lightning.errors import UserError

from .base import DiffusionModel


def load_teacher(path: str | Path) -> tuple[DiffusionModel, dict[str, Any]]:
    """The frozen teacher (its EMA weights) of a framework checkpoint, with the config that rebuilds it."""
    from diffusion_lightning.checkpoint import model_from_checkpoint

    teacher = model_from_checkpoint(path, ema=True)
    config = {"model": teacher.run_config["model"], "rebuild_kwargs": teacher.rebuild_kwargs()}
    return teacher, config


class StudentModel(DiffusionModel):
    """A recipe whose network starts as a copy of a frozen teacher's (any variance-preserving model of the framework:
    DDPM, improved DDPM, latent diffusion, continuous-time ``vdiff_*`` or a distilled one).

    The student is fed the teacher's noise conditioning on the teacher's continuous time (a cosine model's t, or t =
    (k + 1) / T at the levels of a discrete one, :class:`~diffusion_lightning.diffusion.schedules.DiscreteTime`), so
    :meth:`vp_denoiser` over the copy is the teacher's own denoiser at the start. Images, classes, latent encoding and
    decoding are the teacher's. A checkpoint stores the teacher's config (:meth:`rebuild_kwargs`) and rebuilds it
    without the teacher's file.

    Args:
        teacher_ckpt: the teacher's checkpoint (its EMA weights are used).
        teacher_config: instead, the teacher's config as JSON (``{"model": ..., "rebuild_kwargs": ...}``): how a
            student's checkpoint rebuilds its teacher; the weights come from its state dict.
        dropout: the student's dropout probability (None: the teacher's).
        recipe: the recipe's name and its experiments' prefix, for the error when no teacher is given.
        **kwargs: the :class:`~.base.DiffusionModel` arguments (sampler, optimiser, speed options).
    """

    def __init__(
        self,
        teacher_ckpt: str | None = None,
        teacher_config: str | None = None,
        dropout: float | None = None,
        sampler: Mapping[str, Any] | None = None,
        recipe: tuple[str, str] = ("this recipe", "the"),
        **kwargs: Any,
    ) -> None:
        if teacher_ckpt:
            teacher, config = load_teacher(teacher_ckpt)
        elif teacher_config:
            config = json.loads(teacher_config)
            teacher = instantiate(config["model"], _convert_="all", **config.get("rebuild_kwargs", {}))
        else:
            raise UserError(f"{recipe[0]} needs its teacher: set model.teacher_ckpt=<run>/checkpoints/last.ckpt, or "
                            f"leave it null in a {recipe[1]}_* experiment to train or reuse one")  # fmt: skip
        student = copy.deepcopy(teacher.net).requires_grad_(True)
        if dropout is not None:
            for m in student.modules():
                if isinstance(m, nn.Dropout):
                    m.p = dropout
        super().__init__(student, sampler, class_dropout=getattr(teacher, "class_dropout", 0.0), **kwargs)
        self.teacher: DiffusionModel = teacher.eval().requires_grad_(False)
        self.teacher_config = config
        den = teacher.denoiser()
        if isinstance(den, DiscreteVPDenoiser):
            self.time, self.time_input = den.time, "timestep"
        elif isinstance(den, ContinuousVPDenoiser):
            self.time, self.time_input = den.time, den.time_input
        else:
            raise UserError(f"{type(teacher).__name__} is no variance-preserving model: {recipe[0]} takes DDPM, "
                            "improved DDPM, latent diffusion, continuous-time (vdiff_*) or distilled teachers")
        self.teacher_prediction_type: PredictionType = den.prediction_type
        # the copy came from an eval-mode teacher, and Lightning keeps the mode a module starts fit in: the student's
        # dropout would never be active
        self.net.train()

    # ------------------------------------------------------------------ what callers ask
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.teacher.image_shape

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.teacher.sample_shape

    @property
    def num_classes(self) -> int | None:
        return self.teacher.num_classes

    def encode(self, x: Tensor) -> Tensor:
        return self.teacher.encode(x)

    def decode(self, x: Tensor) -> Tensor:
        return self.teacher.decode(x)

    def vp_denoiser(self, net: nn.Module, prediction_type: PredictionType) -> ContinuousVPDenoiser:
        """``net`` (the student or a copy of it) through the denoiser contract on the teacher's time; a learned-variance
        network's second half is not used."""
        channels = self.sample_shape[0]

        def fn(z: Tensor, c_noise: Tensor, y: Tensor | None) -> Tensor:
            y = y if self.num_classes else None
            out = self.network(z, c_noise, y) if net is self.net else net(z, c_noise, y)
            return out[:, :channels]

        return ContinuousVPDenoiser(fn, self.time, prediction_type, self.time_input)

    def sampler_spec(self, sampler: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
        """The teacher's constraints on the settings (e.g. no clipping of latents); a learned-variance teacher's
        ``learned_range`` becomes ``fixed_small`` (the student has no variance output)."""
        spec = self.teacher.sampler_spec(self.sampler if sampler is None else sampler, **overrides)
        if spec.get("variance_type") == "learned_range":
            spec["variance_type"] = "fixed_small"
        return spec

    def teacher_denoiser(self) -> Denoiser:
        """The loaded teacher through the denoiser contract."""
        return self.teacher.denoiser()

    def train(self, mode: bool = True) -> StudentModel:
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        return self

    def frozen_modules(self) -> list[nn.Module]:
        """Modules that stay in eval mode while the student trains (the teacher)."""
        return [self.teacher]

    def rebuild_kwargs(self) -> dict[str, Any]:
        return {"teacher_ckpt": None, "teacher_config": json.dumps(self.teacher_config)}
