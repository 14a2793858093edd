"""The engine every diffusion recipe runs on (Stability-AI/generative-models' ``DiffusionEngine``): a network, a first
stage, a conditioner and a sampler setting injected as components, one training template, one sampling pipeline.

A recipe subclasses :class:`DiffusionModel` and defines two things: :meth:`~DiffusionModel.loss`, the per-sample
training loss on ``x0`` (in the space it diffuses in) under a condition, and :meth:`~DiffusionModel.denoiser`, its
network presented through the denoiser contract of :mod:`diffusion_lightning.diffusion.denoisers`. Training is, for
every recipe and stage: batch -> first-stage encode -> conditioner -> classifier-free dropout -> loss -> weights ->
logs (:meth:`~DiffusionModel.shared_step`); sampling is prior noise -> sampler -> decode
(:meth:`~DiffusionModel.sample`). Callbacks and entry points only use :meth:`~DiffusionModel.sample`, ``image_shape``,
``num_classes`` and ``sampler``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lightning.diffusion import Denoiser, Guided, sample
from diffusion_lightning.diffusion.conditioning import Cond, cond_map, drop_condition
from diffusion_lightning.diffusion.denoisers import Unbounded
from diffusion_lightning.diffusion.grids import sampling_sigmas
from diffusion_lightning.diffusion.sampling import check_sampler
from diffusion_lightning.errors import UserError

from .conditioners import ClassLabels
from .first_stage import PixelSpace
from .lr_schedules import linear_warmup  # noqa: F401 - checkpoints before issue 29 name it here
from .run_module import RunModule
from .speed import _COMPILED, _EagerFallback, compiled

log = logging.getLogger(__name__)
OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
#: What :meth:`DiffusionModel.loss` returns: the per-sample loss, or it and named extra values (module docstring).
LossOutput = Tensor | tuple[Tensor, dict[str, Tensor]]


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def weighted_mean(out: LossOutput) -> Tensor:
    """The batch mean of a :meth:`DiffusionModel.loss` output, its ``weights`` applied: what training minimises."""
    loss, extras = out if isinstance(out, tuple) else (out, {})
    return (loss * extras["weights"] if "weights" in extras else loss).mean()


class DiffusionModel(RunModule):
    """Base of the recipes (module docstring).

    Args:
        net: the network; it gives a pixel model's ``image_shape`` (``in_channels``, ``image_size``).
        sampler: the model's own sampler settings (a ``conf/sampler`` entry: ``name``, ``steps``, ``grid``, options),
            used whenever a caller names none.
        optimizer: a factory ``optimizer(params)`` (a Hydra ``_partial_`` target); default AdamW(lr=2e-4).
        lr_scheduler: a factory ``lr_scheduler(optimizer)`` stepped every optimizer step, or None.
        channels_last: keep the network's weights and inputs in channels-last memory format (faster convolutions
            on tensor cores); None: on when CUDA is available.
        compile: run the training forward through ``torch.compile`` of the network (eval, sampling and the EMA copy
            stay eager); None: on when training on a CUDA device. Where compilation is unsupported or fails, one
            log line says so and the run goes on eagerly.
        class_dropout: the probability p that a training sample's whole condition is replaced by its null value
            (label ``num_classes``, zero tokens, a zero image), so that one network learns the conditional and the
            unconditional denoiser (classifier-free guidance, Ho & Salimans 2022, Alg. 1; they use p = 0.1 or 0.2).
        guidance: the guidance scale w sampling uses when a call names none (None or 1: the conditional denoiser);
            needs ``class_dropout > 0``.
        first_stage: the space the recipe diffuses in: :class:`~.first_stage.PixelSpace` (None) or a
            :class:`~.first_stage.LatentSpace`.
        conditioner: what turns a batch into the condition (:mod:`.conditioners`); None: the class labels when
            ``net.num_classes`` is set, else no condition.
    """

    #: False for a recipe whose first stage and conditioner are another model's (a student's are its teacher's).
    owns_components = True

    def __init__(
        self,
        net: nn.Module,
        sampler: Mapping[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        channels_last: bool | None = None,
        compile: bool | None = None,
        class_dropout: float = 0.0,
        guidance: float | None = None,
        first_stage: nn.Module | None = None,
        conditioner: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        first_stage = first_stage if first_stage is not None else PixelSpace()
        if self.owns_components:
            self.first_stage = first_stage
            self.conditioner = conditioner if conditioner is not None else ClassLabels(net.num_classes)
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout is a probability in [0, 1), got {class_dropout}")
        self.class_dropout, self.guidance = float(class_dropout), guidance
        self.channels_last = torch.cuda.is_available() if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.compile = compile
        self.sampler = {"name": "ddim", "steps": 50, **(sampler or {})}
        for key, factory in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler)):
            if factory is not None and not callable(factory):  # e.g. an experiment's keys merged over a null entry
                raise UserError(
                    f"model.{key} is {factory}, with no _target_ to build: an experiment set keys of it over a model "
                    f"config without one. Give the whole entry (model.{key}._target_=... with _partial_: true) or "
                    f"model.{key}=null, or use the model's own experiment"
                )
        self.optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, lr=2e-4)
        self.lr_scheduler_factory = lr_scheduler
        if (latent := first_stage.latent_shape) is not None and hasattr(net, "image_size"):
            net_shape = (net.in_channels, net.image_size, net.image_size)
            if tuple(latent) != net_shape:
                raise UserError(
                    f"the first stage's latents have shape {tuple(latent)} but the network takes {net_shape}: set "
                    f"model.net.in_channels={latent[0]} and model.net.image_size={latent[1]}"
                )

    # ------------------------------------------------------------------ what callers ask
    def identity(self) -> dict[str, str | None]:
        teacher = getattr(self, "teacher", None)
        return {"recipe": type(self).__name__, "first_stage": type(self.first_stage).__name__,
                "teacher": type(teacher).__name__ if teacher is not None else None}  # fmt: skip

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images :meth:`sample` returns."""
        return self.first_stage.image_shape or (self.net.in_channels, self.net.image_size, self.net.image_size)

    @property
    def num_classes(self) -> int | None:
        """Number of classes of a class-conditional model, else None."""
        return self.conditioner.num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample in the space the sampler runs in (the image for a pixel model)."""
        return self.first_stage.latent_shape or self.image_shape

    def denoiser(self) -> Denoiser:
        """The network through the denoiser contract: D(x, sigma, cond) -> x0_hat."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] in the space the model diffuses in (the identity for a pixel model)."""
        return self.first_stage.encode(x)

    def decode(self, x: Tensor) -> Tensor:
        """The sampler's output as images in [-1, 1] (the identity for a pixel model)."""
        return self.first_stage.decode(x)

    def network(self, x: Tensor, *args: Any) -> Tensor:
        """``net(x, *args)`` with the speed options: ``x`` in channels-last format when ``channels_last``, and in
        training mode the compiled network when ``compile`` (see :func:`~.speed.compiled`)."""
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        use_compile = self.compile if self.compile is not None else x.is_cuda
        net = compiled(self.net) if use_compile and self.training else self.net
        return net(x, *args)

    def condition(self, x: Tensor | None, y: Tensor | None) -> Cond:
        """The conditioner's condition for images ``x`` (None when sampling) and labels ``y``."""
        return self.conditioner(x, y)

    def guided_denoiser(self, guidance: float | None) -> Denoiser:
        """:meth:`denoiser`, under classifier-free guidance with scale ``guidance`` (None or 1: unguided), declaring
        that a latent model's x0 is no image (no clipping)."""
        denoiser = self.denoiser()
        if not self.first_stage.bounded:
            denoiser = Unbounded(denoiser)
        if guidance is None or guidance == 1:
            return denoiser
        if not self.num_classes and isinstance(self.conditioner, ClassLabels):
            raise UserError(f"guidance={guidance} needs a conditional model (class-conditional: model.net.num_classes, "
                            "or a model.conditioner); this one is unconditional")
        if self.class_dropout == 0:
            raise UserError(
                f"guidance={guidance} needs a model trained with condition dropout: this one has "
                "model.class_dropout=0, so its null condition was never trained. Train with model.class_dropout=0.1, "
                "or sample with guidance=null"
            )
        return Guided(denoiser, guidance, null_label=self.num_classes)

    @property
    def compiled_network_active(self) -> bool:
        """Whether the training forward runs the ``torch.compile``d network (False before its first call, when
        ``compile`` is off, or after compilation failed and it fell back to eager)."""
        wrapper = _COMPILED.get(self.net)
        return isinstance(wrapper, _EagerFallback) and wrapper.compiled_net is not None

    def sampler_spec(self, sampler: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
        """The sampler settings a call runs with: ``sampler`` (or the model's own when None; without a ``name``, keys
        that change the model's own) updated by ``overrides``; a :class:`~diffusion_lightning.errors.UserError` names
        what is wrong with them, before any network runs. What the model itself decides (clipping, the variance, a
        distilled step count, the sampler family of a consistency model) its denoiser declares."""
        own = self.sampler if sampler is None or "name" not in sampler else {}
        spec = {**own, **(sampler or {}), **overrides}
        denoiser = self.denoiser()
        if spec.get("steps") is None and denoiser.default_steps is not None:
            spec["steps"] = denoiser.default_steps  # e.g. a distilled model's own step count
        if denoiser.samplers and spec.get("name") not in denoiser.samplers:
            raise UserError(f"sampler={spec.get('name')} does not sample a {type(self).__name__} model, which "
                            f"maps noise to data directly: use sampler={' or sampler='.join(denoiser.samplers)}")
        if denoiser.default_steps is not None and str(spec.get("steps")) != str(denoiser.default_steps):
            _warn_once(f"{type(self).__name__} was distilled for {denoiser.default_steps} sampling steps; "
                       f"sampler.steps={spec.get('steps')} is outside what it was trained for")  # fmt: skip
        try:
            check_sampler(spec.get("name", ""), {k: v for k, v in spec.items() if k != "name"})
            sampling_sigmas(denoiser, spec.get("steps"), spec.get("grid", "native"), spec.get("rho", 7.0))
        except ValueError as e:
            raise UserError(f"{e} (sampler settings: {spec})") from None
        return spec

    def check_sampling(self, sampler: Mapping[str, Any] | None = None, guidance: float | None = None) -> None:
        """Raise the :class:`~diffusion_lightning.errors.UserError` that sampling with ``sampler`` and ``guidance``
        (None: the model's own) would raise, without sampling: training calls it before its first step for the grids
        and metrics it will draw."""
        self.sampler_spec(sampler)
        self.guided_denoiser(self.guidance if guidance is None else guidance)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int | None = None,
        *,
        noise: Tensor | None = None,
        y: Tensor | None = None,
        cond: Cond = None,
        generator: torch.Generator | None = None,
        progress: Any = None,
        sampler: Mapping[str, Any] | None = None,
        guidance: float | None = None,
        return_nfe: bool = False,
        **overrides: Any,
    ) -> Tensor | tuple[Tensor, int]:
        """Images in [-1, 1]: prior noise -> sampler -> :meth:`decode`, in eval mode.

        ``noise`` (standard normal, ``sample_shape``) or ``num_samples`` of it drawn from ``generator``; ``y`` class
        labels (random ones from ``generator`` for a class-conditional model when None) made into the condition by
        the conditioner, or ``cond`` the condition itself (tokens, an image); ``sampler`` replaces the model's own
        settings and ``overrides`` update them (e.g. ``steps=20``); ``guidance`` the classifier-free guidance scale
        (None: the model's own). With ``return_nfe`` also the counted network evaluations per sample (a guided
        evaluation is one call on a doubled batch).
        """
        spec = self.sampler_spec(sampler, **overrides)
        name = spec.pop("name")
        if noise is None:
            if num_samples is None:
                raise ValueError("give num_samples or noise")
            noise = torch.randn(num_samples, *self.sample_shape, generator=generator)
        noise = noise.to(self.device)
        if cond is None:
            if self.num_classes and y is None:
                y = torch.randint(0, self.num_classes, (noise.shape[0],), generator=generator)
            y = y.to(self.device) if y is not None and self.num_classes else None
            cond = self.condition(None, y) if y is not None else None
        cond = cond_map(cond, lambda t: t.to(self.device))
        denoiser = self.guided_denoiser(self.guidance if guidance is None else guidance)
        with self.eval_mode():
            out = sample(denoiser, noise, name, y=cond, generator=generator, progress=progress, **spec)
            images = self.decode(out.x).clamp(-1, 1)
        return (images, out.nfe) if return_nfe else images

    # ------------------------------------------------------------------ training
    def loss(self, x0: Tensor, cond: Cond) -> LossOutput:
        """The recipe's per-sample training loss (B,) on ``x0`` (in the space it diffuses in) under ``cond``; or
        (loss, extras): ``extras["weights"]`` (B,) multiplies the loss, every other entry's mean is logged as
        ``<stage>/<name>``, except names starting with ``_``, which only :meth:`on_loss` sees."""
        raise NotImplementedError

    def on_loss(self, loss: Tensor, extras: dict[str, Tensor], stage: str) -> None:
        """Called after every training and validation loss with the per-sample loss (detached, before weights) and
        the extras (a recipe's loss statistics, e.g. DDPM's per-quarter losses)."""

    def step_values(self) -> dict[str, float]:
        """Values of the training step logged under these names with no reduction (e.g. a curriculum's level)."""
        return {}

    def batch_loss(
        self, batch: tuple[Tensor, Tensor], stage: str = "train"
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The template without its logs (module docstring): a batch of (images, labels) -> first-stage encode ->
        condition (dropped for guidance in ``train``) -> :meth:`loss`; returns the weighted mean that is minimised,
        the per-sample loss and the extras."""
        x, y = batch
        x0, cond = self.encode(x), self.condition(x, y)
        if stage == "train":
            cond = drop_condition(cond, self.class_dropout, self.num_classes)
        out = self.loss(x0, cond)
        loss, extras = out if isinstance(out, tuple) else (out, {})
        return weighted_mean(out), loss, extras

    def shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        """:meth:`batch_loss` in ``stage`` (``train`` or ``val``), logged: ``<stage>/loss``, the extras' means,
        :meth:`step_values`, then :meth:`on_loss`."""
        mean, loss, extras = self.batch_loss(batch, stage)
        batch_size = len(batch[0])
        self.log_loss(mean, stage, batch_size)
        for name, value in extras.items():
            if name != "weights" and not name.startswith("_"):
                self.log(f"{stage}/{name}", value.mean(), batch_size=batch_size, sync_dist=stage != "train")
        if stage == "train":
            for name, value in self.step_values().items():
                self.log(name, float(value), batch_size=1)
        self.on_loss(loss.detach(), extras, stage)
        return mean

    def log_loss(self, loss: Tensor, stage: str, batch_size: int) -> None:
        """``<stage>/loss``, the mean over ranks (a scalar all-reduce, no host synchronisation): in training per step
        (through the NaN/Inf watch), in validation per epoch. (Lightning refuses a key whose ``sync_dist`` changes
        within an epoch, so training syncs at every step, not at logging steps only.)"""
        train = stage == "train"
        if train and self.nonfinite == "stop":
            self.watch_finite(loss)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        with self.global_batch_draws(len(batch[0])):
            return self.shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # The same t and noise for a batch at every validation (a smoother curve), drawn outside training's
        # random stream, so validating does not change what training draws next (exact resume).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(batch_idx)
            self.shared_step(batch, "val")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, except that a fused optimiser is allowed where no gradient scaler is in use
        (bf16-mixed): Lightning's mixed-precision plugin refuses every fused optimiser with clipping, though only
        fp16's loss scaling (gradients still scaled when clipping) needs that."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if gradient_clip_val and fused and scaler is None and gradient_clip_algorithm in (None, "norm"):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the global gradient norm before any clipping (``train/grad_norm``, as the papers' code logs it), at
        logging steps only (it is a pass over all gradients)."""
        if not self.is_logging_step():
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), batch_size=1)

    def on_fit_start(self) -> None:
        self.first_stage.on_fit_start(self)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        # e.g. a student whose teacher was trained at another size: refused before any step
        datamodule = getattr(self.trainer, "datamodule", None)
        size, channels = getattr(datamodule, "image_size", None), getattr(datamodule, "channels", None)
        if size is not None and (channels, size, size) != tuple(self.image_shape):
            c, model_size, _ = self.image_shape
            fix = f"data.image_size={model_size}" if model_size != size else f"a data set with {c} channels"
            raise UserError(f"the data gives {channels}x{size}x{size} images but {type(self).__name__} makes "
                            f"{c}x{model_size}x{model_size}: set {fix}")  # fmt: skip
        # Training draws start from the seed itself, as Lightning's DDP set-up reseeds after the model was built:
        # one process and W processes then draw the same numbers (models/global_batch.py).
        torch.manual_seed(torch.initial_seed())
        if self.trainer.world_size > 1:
            self.share_rng()  # the global batch's draws, then distinct per-rank streams (dropout; rank 0 keeps its own)
            if self.global_rank > 0:
                torch.manual_seed(torch.initial_seed() + 1000003 * self.global_rank)

    # ------------------------------------------------------------------ checkpoints
    def rebuild_kwargs(self) -> dict[str, Any]:
        """The components built from other files (a first stage, a teacher), as the configs that rebuild them
        (``component_config``, set by their loaders); the weights then come from this checkpoint's state dict."""
        return {name: {"_target_": "diffusion_lightning.checkpoint.build_component", "_recursive_": False,
                       "config": module.component_config}
                for name, module in self.named_children() if getattr(module, "component_config", None)}  # fmt: skip
