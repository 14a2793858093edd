"""What every diffusion recipe shares: the sampling pipeline (prior noise -> sampler -> decode), the optimiser and LR
schedule from config, per-rank seeding, RNG state in checkpoints and the logged gradient norm.

A recipe subclasses :class:`DiffusionModel`, defines its training step and :meth:`~DiffusionModel.denoiser` (its
network presented through the denoiser contract of :mod:`diffusion_lightning.diffusion.denoisers`), and, for a
latent model, :meth:`~DiffusionModel.decode`. Callbacks and entry points only use :meth:`~DiffusionModel.sample`,
``image_shape``, ``num_classes`` and ``sampler``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from diffusion_lightning.diffusion import Denoiser, Guided, sample
from diffusion_lightning.diffusion.sampling import check_sampler
from diffusion_lightning.errors import UserError

from .global_batch import GlobalBatchDraws

log = logging.getLogger(__name__)

#: Written into every checkpoint; 1 (absent) = before the denoiser contract (issue 14). See
#: :func:`diffusion_lightning.checkpoint.upgrade_run_config`.
CHECKPOINT_FORMAT = 2

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate ramped linearly from lr / warmup_steps to lr over the first ``warmup_steps`` optimizer
    steps, then constant (DDPM: 5000 steps)."""
    warmup = max(int(warmup_steps), 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))


class RunModule(L.LightningModule):
    """What every LightningModule of a run shares (the diffusion recipes and the stage-1 autoencoder): the run config
    and RNG state in its checkpoints, the NaN/Inf watch that never lets a checkpoint of non-finite weights be written,
    and eval mode for inference."""

    def __init__(self) -> None:
        super().__init__()
        # The resolved run config (set by the training entry); saved so a checkpoint rebuilds its model.
        self.run_config: dict[str, Any] | None = None
        self._first_nonfinite_step: Tensor | None = None  # see watch_finite
        self._shared_rng: dict[str, torch.Generator] | None = None  # see share_rng
        # A non-finite loss: "stop" the run (the checkpoints before it kept) or "skip" the step (set by the training
        # entry from the run config's ``nonfinite``; see optimizer_step).
        self.nonfinite = "stop"
        self.skipped_steps = 0
        self._skips_in_a_row = 0

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Eval mode (no dropout) inside, the previous mode restored after."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def is_logging_step(self) -> bool:
        """Whether this training step's logged values reach the loggers (every ``trainer.log_every_n_steps``)."""
        return self._trainer is None or self.trainer._logger_connector.should_update_logs

    def watch_finite(self, loss: Tensor) -> None:
        """Note the first optimizer step whose training loss is NaN/Inf, on the device (no synchronisation); it is
        checked by :meth:`check_finite` at logging steps, before every checkpoint is written and at the end."""
        bad = ~torch.isfinite(loss.detach())
        if self._first_nonfinite_step is None:
            self._first_nonfinite_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        first = self._first_nonfinite_step
        self._first_nonfinite_step = torch.where(bad & (first < 0), self.global_step, first)

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the first step with a non-finite loss, if there was one."""
        if self._first_nonfinite_step is not None and (step := int(self._first_nonfinite_step)) >= 0:
            raise FloatingPointError(
                f"non-finite training loss at global step {step} (the weights after it are not finite); lower "
                "model.optimizer.lr, raise the warm-up or check the data. Checkpoints written before it are kept."
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.is_logging_step():
            self.check_finite()

    def on_train_end(self) -> None:
        self.check_finite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()  # never write a checkpoint of weights that a non-finite loss has updated
        if self.run_config is not None:
            checkpoint["run_config"] = self.run_config
        checkpoint["format"] = CHECKPOINT_FORMAT
        checkpoint["rng_states"] = _rng_states()
        checkpoint["skipped_steps"] = self.skipped_steps
        if self._shared_rng is not None:
            checkpoint["shared_rng_states"] = {kind: g.get_state() for kind, g in self._shared_rng.items()}
        if rebuild := self.rebuild_kwargs():
            checkpoint["rebuild_kwargs"] = rebuild

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Arguments that replace the run config's when a checkpoint rebuilds this module: what points at other files
        (a first stage, a teacher) is replaced by their stored configs, the weights then come from the state dict."""
        return {}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """With ``nonfinite="skip"``: the forward and backward run first, and the update is skipped (the step still
        counts, as a gradient scaler's skipped steps do) when the gradient is not finite. Gradients are checked, not
        the loss: under DDP they are the same on every rank after their all-reduce, so all ranks skip together.
        Skips are counted (``train/skipped_steps``, in checkpoints); 20 in a row stop the run."""
        if self.nonfinite != "skip" or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        loss = optimizer_closure()
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
            self._skips_in_a_row = 0
            return optimizer.step(closure=lambda: loss)
        self.skipped_steps += 1
        self._skips_in_a_row += 1
        optimizer.zero_grad()
        log.warning(f"non-finite gradient at global step {self.global_step}: update skipped "
                    f"({self.skipped_steps} skipped so far)")  # fmt: skip
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        if self._skips_in_a_row >= 20:
            raise FloatingPointError(
                f"20 steps in a row with a non-finite gradient, up to global step {self.global_step}: lower "
                "model.optimizer.lr or check the data. Checkpoints written before are kept."
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        # Restoring the RNG makes a resumed run draw the same data order, t and noise as an
        # uninterrupted one (exact when resuming at an epoch boundary on one process).
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])
            if self._trainer is not None and self.trainer.world_size > 1:
                self.share_rng(checkpoint.get("shared_rng_states"))
                if self.global_rank > 0:
                    torch.manual_seed(int(torch.randint(2**31, (1,))) + 1000003 * self.global_rank)

    def share_rng(self, states: dict[str, Tensor] | None = None) -> None:
        """Under DDP: the generators all ranks share for the global batch's draws (:meth:`global_batch_draws`), from
        ``states`` (a checkpoint's) or a copy of rank 0's default generators (broadcast: equal on all ranks even in an
        unseeded run)."""
        device, strategy = self.trainer.strategy.root_device, self.trainer.strategy
        self._shared_rng = {"cpu": torch.Generator()}
        self._shared_rng["cpu"].set_state(strategy.broadcast(torch.get_rng_state()))
        if device.type == "cuda":
            self._shared_rng["cuda"] = torch.Generator(device=device)
            self._shared_rng["cuda"].set_state(strategy.broadcast(torch.cuda.get_rng_state(device)))
        for kind, state in (states or {}).items():
            if kind in self._shared_rng:
                self._shared_rng[kind].set_state(state)

    def global_batch_draws(self, batch_size: int) -> contextlib.AbstractContextManager:
        """Under DDP, the per-sample draws inside are made for the global batch and sliced to this rank's rows
        (:class:`~diffusion_lightning.models.global_batch.GlobalBatchDraws`); a no-op on one process."""
        if self._trainer is None or self.trainer.world_size == 1 or self._shared_rng is None:
            return contextlib.nullcontext()
        return GlobalBatchDraws(batch_size, self.trainer.world_size, self.global_rank, self._shared_rng)


class DiffusionModel(RunModule):
    """Base of the recipes (module docstring).

    Args:
        net: the network; it gives the default ``image_shape`` (``in_channels``, ``image_size``) and ``num_classes``.
        sampler: the model's own sampler settings (a ``conf/sampler`` entry: ``name``, ``steps``, ``grid``, options),
            used whenever a caller names none.
        optimizer: a factory ``optimizer(params)`` (a Hydra ``_partial_`` target); default AdamW(lr=2e-4).
        lr_scheduler: a factory ``lr_scheduler(optimizer)`` stepped every optimizer step, or None.
        channels_last: keep the network's weights and inputs in channels-last memory format (faster convolutions
            on tensor cores); None: on when CUDA is available.
        compile: run the training forward through ``torch.compile`` of the network (eval, sampling and the EMA copy
            stay eager); None: on when training on a CUDA device. Where compilation is unsupported or fails, one
            log line says so and the run goes on eagerly.
        class_dropout: for a class-conditional network, the probability p that a training label is replaced by the
            null class (label ``num_classes``), so that one network learns the conditional and the unconditional
            denoiser (classifier-free guidance, Ho & Salimans 2022, Alg. 1; they use p = 0.1 or 0.2).
        guidance: the guidance scale w sampling uses when a call names none (None or 1: the conditional denoiser);
            needs ``class_dropout > 0``.
    """

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
    ) -> None:
        super().__init__()
        self.net = net
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

    # ------------------------------------------------------------------ what callers ask
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images :meth:`sample` returns."""
        return (self.net.in_channels, self.net.image_size, self.net.image_size)

    @property
    def num_classes(self) -> int | None:
        """Number of classes of a class-conditional model, else None."""
        return self.net.num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample in the space the sampler runs in (the image for a pixel model)."""
        return self.image_shape

    def denoiser(self) -> Denoiser:
        """The network through the denoiser contract: D(x, sigma, y) -> x0_hat."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] in the space the model diffuses in (the identity for a pixel model)."""
        return x

    def decode(self, x: Tensor) -> Tensor:
        """The sampler's output as images in [-1, 1] (the identity for a pixel model)."""
        return x

    def network(self, x: Tensor, *args: Any) -> Tensor:
        """``net(x, *args)`` with the speed options: ``x`` in channels-last format when ``channels_last``, and in
        training mode the compiled network when ``compile`` (see :func:`compiled`)."""
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        use_compile = self.compile if self.compile is not None else x.is_cuda
        net = compiled(self.net) if use_compile and self.training else self.net
        return net(x, *args)

    def drop_labels(self, y: Tensor | None) -> Tensor | None:
        """Training labels with each replaced by the null class ``num_classes`` with probability ``class_dropout``."""
        if y is None or not self.num_classes or self.class_dropout == 0:
            return y
        drop = torch.rand(y.shape, device=y.device) < self.class_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def guided_denoiser(self, guidance: float | None) -> Denoiser:
        """:meth:`denoiser`, under classifier-free guidance with scale ``guidance`` (None or 1: unguided)."""
        if guidance is None or guidance == 1:
            return self.denoiser()
        if not self.num_classes:
            raise UserError(f"guidance={guidance} needs a class-conditional model (model.net.num_classes is null)")
        if self.class_dropout == 0:
            raise UserError(
                f"guidance={guidance} needs a model trained with label dropout: this one has model.class_dropout=0, so "
                "its null class was never trained. Train with model.class_dropout=0.1, or sample with guidance=null"
            )
        return Guided(self.denoiser(), guidance, null_label=self.num_classes)

    @property
    def compiled_network_active(self) -> bool:
        """Whether the training forward runs the ``torch.compile``d network (False before its first call, when
        ``compile`` is off, or after compilation failed and it fell back to eager)."""
        wrapper = _COMPILED.get(self.net)
        return isinstance(wrapper, _EagerFallback) and wrapper.compiled_net is not None

    def sampler_spec(self, sampler: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
        """The sampler settings a call runs with: ``sampler`` (or the model's own when None) updated by
        ``overrides``; a :class:`~diffusion_lightning.errors.UserError` names what is wrong with them."""
        spec = {**(self.sampler if sampler is None else sampler), **overrides}
        try:
            check_sampler(spec.get("name", ""), {k: v for k, v in spec.items() if k != "name"})
        except ValueError as e:
            raise UserError(f"{e} (sampler settings: {spec})") from None
        return spec

    @torch.no_grad()
    def sample(
        self,
        num_samples: int | None = None,
        *,
        noise: Tensor | None = None,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: Any = None,
        sampler: Mapping[str, Any] | None = None,
        guidance: float | None = None,
        return_nfe: bool = False,
        **overrides: Any,
    ) -> Tensor | tuple[Tensor, int]:
        """Images in [-1, 1]: prior noise -> sampler -> :meth:`decode`, in eval mode.

        ``noise`` (standard normal, ``sample_shape``) or ``num_samples`` of it drawn from ``generator``; ``y`` class
        labels (random ones from ``generator`` for a class-conditional model when None); ``sampler`` replaces the
        model's own settings and ``overrides`` update them (e.g. ``steps=20``); ``guidance`` the classifier-free
        guidance scale (None: the model's own). With ``return_nfe`` also the counted network evaluations per sample
        (a guided evaluation is one call on a doubled batch).
        """
        spec = self.sampler_spec(sampler, **overrides)
        name = spec.pop("name")
        if noise is None:
            if num_samples is None:
                raise ValueError("give num_samples or noise")
            noise = torch.randn(num_samples, *self.sample_shape, generator=generator)
        noise = noise.to(self.device)
        if self.num_classes and y is None:
            y = torch.randint(0, self.num_classes, (noise.shape[0],), generator=generator)
        y = y.to(self.device) if y is not None and self.num_classes else None
        denoiser = self.guided_denoiser(self.guidance if guidance is None else guidance)
        with self.eval_mode():
            out = sample(denoiser, noise, name, y=y, generator=generator, progress=progress, **spec)
            images = self.decode(out.x).clamp(-1, 1)
        return (images, out.nfe) if return_nfe else images

    # ------------------------------------------------------------------ training
    def loss(self, x0: Tensor, y: Tensor | None) -> Tensor:
        """The recipe's per-sample training loss on ``x0`` (in the space it diffuses in, :meth:`encode`d)."""
        raise NotImplementedError

    def shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        """The mean of :meth:`loss` on a batch of (images, labels) in ``stage`` (``train``: labels dropped for
        guidance; or ``val``), logged as ``<stage>/loss``."""
        x, y = batch
        loss = self.loss(self.encode(x), self.drop_labels(y) if stage == "train" else y).mean()
        self.log_loss(loss, stage, len(x))
        return loss

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



_COMPILED: weakref.WeakKeyDictionary[nn.Module, Callable[..., Tensor]] = weakref.WeakKeyDictionary()


def compiled(net: nn.Module) -> Callable[..., Tensor]:
    """``torch.compile(net)``, made once per network (kept outside the module, so its ``state_dict`` and copies of it
    are unchanged); where compilation is unsupported or fails, one log line and ``net`` itself (eager) from then on.
    """
    if net not in _COMPILED:
        if not torch._dynamo.is_dynamo_supported():
            log.warning("torch.compile is not supported on this Python/platform: the network runs eagerly")
            _COMPILED[net] = net
        else:
            _COMPILED[net] = _EagerFallback(net, torch.compile(net))
    return _COMPILED[net]


class _EagerFallback:
    """Calls the compiled network; if compiling it fails (no C++ compiler, an unsupported op), logs why once and
    calls the eager network from then on."""

    def __init__(self, net: nn.Module, compiled_net: Callable[..., Tensor]) -> None:
        self.net, self.compiled_net = net, compiled_net

    def __call__(self, *args: Any) -> Tensor:
        if self.compiled_net is not None:
            try:
                return self.compiled_net(*args)
            except Exception as e:  # torch._dynamo / inductor errors have no common public base class
                log.warning(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}): the network "
                            "runs eagerly (set model.compile=false to skip the attempt)")
                self.compiled_net = None
        return self.net(*args)


def _rng_states() -> dict[str, Any]:
    """RNG states as tensors and ints only, so checkpoints load with ``weights_only=True``."""
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), *map(int, np_state[2:4]), float(np_state[4])],
        "python": [list(random.getstate()[1]), random.getstate()[0]],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py_state, version = states["python"]
    random.setstate((version, tuple(py_state), None))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
