"""What every LightningModule of a run shares (the diffusion recipes and the stage-1 autoencoder): the run config and
RNG state in checkpoints, the NaN/Inf watch, skipped non-finite steps, and the generators DDP ranks share for the
global batch's draws."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from .global_batch import GlobalBatchDraws
from .upgrade import CHECKPOINT_FORMAT, upgrade_checkpoint

log = logging.getLogger(__name__)

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
        checkpoint["identity"] = self.identity()
        checkpoint["rng_states"] = _rng_states()
        checkpoint["skipped_steps"] = self.skipped_steps
        if self._shared_rng is not None:
            checkpoint["shared_rng_states"] = {kind: g.get_state() for kind, g in self._shared_rng.items()}
        if rebuild := self.rebuild_kwargs():
            checkpoint["rebuild_kwargs"] = rebuild

    def identity(self) -> dict[str, str | None]:
        """What wrote a checkpoint, stored in it: the recipe (a class of :mod:`diffusion_lightning.models`) and, for a
        diffusion recipe, the kinds of its first stage and teacher; the slots that take checkpoints check it."""
        return {"recipe": type(self).__name__}

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
        upgrade_checkpoint(checkpoint)  # in place, before Lightning loads the state dict and the callbacks' states
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
