"""What the recipes that start from a trained diffusion model share (progressive distillation, consistency
distillation and tuning): the frozen teacher (a component: a built model, e.g. from a framework checkpoint by
:func:`diffusion_lightning.checkpoint.load_teacher`), a student network copied from it, and the student presented
through the denoiser contract on the teacher's own noise conditioning."""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from diffusion_lightning.diffusion import ContinuousVPDenoiser, Denoiser, DiscreteVPDenoiser
from diffusion_lightning.diffusion.conditioning import Cond
from diffusion_lightning.diffusion.gaussian import PredictionType
from diffusion_lightning.errors import UserError

from .base import DiffusionModel


class InTeachersSpace:
    """For a recipe that holds a frozen ``teacher`` model: its images, conditions and first stage are the teacher's
    (registered once, under the teacher), and the teacher stays in eval mode while the recipe trains."""

    owns_components = False  # the teacher's first stage and conditioner (properties below), not registered twice
    teacher: DiffusionModel

    @property
    def first_stage(self) -> nn.Module:  # type: ignore[override]
        return self.teacher.first_stage

    @property
    def conditioner(self) -> nn.Module:  # type: ignore[override]
        return self.teacher.conditioner

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.teacher.image_shape

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.teacher.sample_shape

    def train(self, mode: bool = True) -> InTeachersSpace:
        super().train(mode)  # type: ignore[misc]
        self.teacher.eval()
        return self


class StudentModel(InTeachersSpace, DiffusionModel):
    """A recipe whose network starts as a copy of a frozen teacher's (any variance-preserving model of the framework:
    DDPM, improved DDPM, latent diffusion, continuous-time ``vdiff_*`` or a distilled one).

    The student is fed the teacher's noise conditioning on the teacher's continuous time (a cosine model's t, or t =
    (k + 1) / T at the levels of a discrete one, :class:`~diffusion_lightning.diffusion.schedules.DiscreteTime`), so
    :meth:`vp_denoiser` over the copy is the teacher's own denoiser at the start. Images, conditions, the first stage
    (latent encoding and decoding) and the sampler's constraints are the teacher's: a student diffuses in its
    teacher's space. The checkpoint stores the teacher's config (:meth:`~.base.DiffusionModel.rebuild_kwargs`) and
    rebuilds it without the teacher's file.

    Args:
        teacher: the teacher, a built model (its EMA weights when loaded from a checkpoint).
        dropout: the student's dropout probability (None: the teacher's).
        recipe: the recipe's name and its experiments' prefix, for the error when no teacher is given.
        **kwargs: the :class:`~.base.DiffusionModel` arguments (sampler, optimiser, speed options).
    """

    def __init__(
        self,
        teacher: DiffusionModel | None = None,
        dropout: float | None = None,
        recipe: tuple[str, str] = ("this recipe", "the"),
        **kwargs: Any,
    ) -> None:
        if teacher is None:
            raise UserError(f"{recipe[0]} needs its teacher: set model.teacher.path=<run>/checkpoints/last.ckpt, or "
                            f"leave it null in a {recipe[1]}_* experiment to train or reuse one")  # fmt: skip
        if kwargs.get("first_stage") is not None or kwargs.get("conditioner") is not None:
            raise UserError(f"{recipe[0]} diffuses in its teacher's space under its teacher's conditions: leave "
                            "model.first_stage and model.conditioner unset (the teacher's are used)")  # fmt: skip
        if "class_dropout" in kwargs:
            raise UserError(f"{recipe[0]} keeps its teacher's condition dropout (model.class_dropout="
                            f"{teacher.class_dropout}): remove model.class_dropout")  # fmt: skip
        kwargs.pop("first_stage", None), kwargs.pop("conditioner", None)
        student = copy.deepcopy(teacher.net).requires_grad_(True)
        if dropout is not None:
            for m in student.modules():
                if isinstance(m, nn.Dropout):
                    m.p = dropout
        super().__init__(student, class_dropout=getattr(teacher, "class_dropout", 0.0), **kwargs)
        self.teacher: DiffusionModel = teacher.eval().requires_grad_(False)
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

    def vp_denoiser(self, net: nn.Module, prediction_type: PredictionType) -> ContinuousVPDenoiser:
        """``net`` (the student or a copy of it) through the denoiser contract on the teacher's time; a learned-variance
        network's second half is not used (ancestral sampling then uses fixed_small)."""
        channels = self.sample_shape[0]

        def fn(z: Tensor, c_noise: Tensor, cond: Cond) -> Tensor:
            out = self.network(z, c_noise, cond) if net is self.net else net(z, c_noise, cond)
            return out[:, :channels]

        return ContinuousVPDenoiser(fn, self.time, prediction_type, self.time_input)

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
