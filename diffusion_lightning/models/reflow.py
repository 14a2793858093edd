"""Reflow (Liu et al. 2023, "Flow Straight and Fast", Sec. 2.2 / Alg. 1): the (k+1)-rectified flow is flow matching
on the coupling that the k-rectified flow defines: pairs (x0, eps) = (the teacher's ODE solution from eps, eps),
generated once into a file and trained on with the straight-path loss; the student starts as the teacher's network."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion_lightning.diffusion import sample
from diffusion_lightning.diffusion.conditioning import drop_condition
from diffusion_lightning.errors import UserError

from .base import weighted_mean
from .flow_matching import FlowMatching
from .student import InTeachersSpace

log = logging.getLogger(__name__)


class Reflow(InTeachersSpace, FlowMatching):
    """Flow matching on the coupling of a trained flow model (the teacher, frozen): ``num_pairs`` noises eps_i (and,
    for a class-conditional teacher, labels y_i) drawn from ``pair_seed``, each mapped by the teacher's own sampler to
    x0_i; the student (a copy of the teacher's network) is trained on ||v_hat(x_t, t) - (eps_i - x0_i)||^2 at
    x_t = (1 - t) x0_i + t eps_i for pairs drawn uniformly (a draw per sample, so DDP ranks draw the global batch's).

    The pairs are written once to ``pairs_path`` (float16; by rank 0, read by every rank) and read from there when the
    run resumes; the data module's batches only set the batch size and the step clock. The images, conditions and
    first stage are the teacher's.

    Args:
        teacher: the k-rectified flow, a built :class:`~.flow_matching.FlowMatching` model (its EMA weights).
        num_pairs: pairs generated (Liu et al.'s CIFAR-10 reflow: 4M; a small data set's size here).
        pairs_path: the file of the pairs (e.g. in the run folder); None: ``reflow_pairs.pt`` in the working directory.
        pair_sampler: the teacher's sampler settings for the pairs (None: its own).
        pair_batch: samples per batch while generating.
        pair_seed: the seed of the noises and labels.
        **kwargs: the :class:`~.flow_matching.FlowMatching` arguments (time density, sampler, optimiser, ...); the
            prediction type and condition dropout are the teacher's.
    """

    def __init__(
        self,
        teacher: FlowMatching | None = None,
        num_pairs: int = 10000,
        pairs_path: str | None = None,
        pair_sampler: dict[str, Any] | None = None,
        pair_batch: int = 500,
        pair_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if teacher is None:
            raise UserError("reflow needs its teacher: set model.teacher.path=<fm run>/checkpoints/last.ckpt, or leave "
                            "it null in an rf*_ experiment to train or reuse one")  # fmt: skip
        if not isinstance(teacher, FlowMatching):
            raise UserError(f"reflow rectifies a flow-matching model (fm_*, rf*_ runs); the teacher is a "
                            f"{type(teacher).__name__}")  # fmt: skip
        for key in ("first_stage", "conditioner", "prediction_type", "class_dropout"):
            if key in kwargs:
                raise UserError(f"reflow keeps its teacher's {key}: remove model.{key}")
        if num_pairs < 1:
            raise UserError(f"model.num_pairs must be positive, got {num_pairs}")
        student = copy.deepcopy(teacher.net).requires_grad_(True)
        super().__init__(student, prediction_type=teacher.prediction_type, class_dropout=teacher.class_dropout,
                         **kwargs)  # fmt: skip
        self.teacher = teacher.eval().requires_grad_(False)
        self.num_pairs, self.pair_batch, self.pair_seed = int(num_pairs), int(pair_batch), int(pair_seed)
        self.pairs_path = Path(pairs_path or "reflow_pairs.pt")
        self.pair_sampler = dict(pair_sampler) if pair_sampler else None
        self.pairs: dict[str, Tensor] | None = None
        self.net.train()  # the copy came from an eval-mode teacher

    # ------------------------------------------------------------------ the pairs
    @torch.no_grad()
    def make_pairs(self, progress: Any = None) -> dict[str, Tensor]:
        """eps (float16), the teacher's x0 for it (float16, in the space it diffuses in) and the labels (or none)."""
        g = torch.Generator().manual_seed(self.pair_seed)
        noise = torch.randn(self.num_pairs, *self.sample_shape, generator=g)
        classes = self.teacher.num_classes
        labels = torch.randint(0, classes, (self.num_pairs,), generator=g) if classes else None
        spec = self.teacher.sampler_spec(self.pair_sampler)
        name = spec.pop("name")
        denoiser = self.teacher.guided_denoiser(self.teacher.guidance)
        samples = []
        for start in range(0, self.num_pairs, self.pair_batch):
            chunk = slice(start, start + self.pair_batch)
            cond = None if labels is None else self.teacher.condition(None, labels[chunk].to(self.device))
            out = sample(denoiser, noise[chunk].to(self.device), name, y=cond, generator=g, **spec)
            samples.append(out.x.cpu())
            if progress:
                progress(start + len(out.x))
        pairs = {"noise": noise.half(), "sample": torch.cat(samples).half()}
        if labels is not None:
            pairs["labels"] = labels
        return pairs

    def load_or_make_pairs(self) -> dict[str, Tensor]:
        """The pairs of ``pairs_path``, written there first (by rank 0) if the file does not exist."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        if not self.pairs_path.is_file() and (strategy is None or strategy.is_global_zero):
            log.info(f"reflow: generating {self.num_pairs} pairs with the teacher into {self.pairs_path}")
            every = max(1, self.num_pairs // (10 * self.pair_batch)) * self.pair_batch  # about ten progress lines
            with self.teacher.eval_mode():
                pairs = self.make_pairs(lambda n: log.info(f"reflow pairs: {n}/{self.num_pairs}")
                                        if n % every == 0 or n == self.num_pairs else None)  # fmt: skip
            self.pairs_path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.pairs_path.with_suffix(".partial")
            torch.save(pairs, partial)
            os.replace(partial, self.pairs_path)  # never a half-written file under the final name
        if strategy is not None:
            strategy.barrier("reflow_pairs")
        pairs = torch.load(self.pairs_path, weights_only=True)
        if len(pairs["noise"]) != self.num_pairs or tuple(pairs["noise"].shape[1:]) != tuple(self.sample_shape):
            raise UserError(f"{self.pairs_path} holds {len(pairs['noise'])} pairs of shape "
                            f"{tuple(pairs['noise'].shape[1:])}, not {self.num_pairs} of {tuple(self.sample_shape)}: "
                            "delete it (or point model.pairs_path elsewhere) to generate them again")  # fmt: skip
        return pairs

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.pairs = self.load_or_make_pairs()

    def batch_loss(
        self, batch: tuple[Tensor, Tensor], stage: str = "train"
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The straight-path loss on ``len(batch[0])`` pairs drawn uniformly (the batch's images are not used)."""
        if self.pairs is None:
            self.pairs = self.load_or_make_pairs()
        index = torch.randint(0, self.num_pairs, (len(batch[0]),))
        x0, eps = (self.pairs[k][index].to(self.device, torch.float32) for k in ("sample", "noise"))
        labels = self.pairs.get("labels")
        cond = None if labels is None else self.condition(None, labels[index].to(self.device))
        if stage == "train":
            cond = drop_condition(cond, self.class_dropout, self.num_classes)
        loss = self.path_loss(x0, eps, cond)
        return weighted_mean(loss), loss, {}
