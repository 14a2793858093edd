"""Preemption and time limits: on a signal, save ``last.ckpt`` at the end of the batch, requeue the SLURM job, stop.

The handler only notes the signal; the save happens at the next batch end (under DDP the next logging step), where
a checkpoint resumes exactly (the same point as a periodic one), never in the middle of a step as Lightning's own
SLURM handler saves. Under DDP the ranks agree on it at logging steps (``trainer.log_every_n_steps``: one all-reduce
of a flag, read back where the step reads its metrics back anyway), so they save the same step. The restarted job
finds the checkpoint itself: with ``SLURM_RESTART_COUNT`` > 0 the training entry resumes from ``<run folder>/
checkpoints/last.ckpt`` (``ckpt_path=last``), and the run folder is the same on a restart (named from the job id
under ``srun``, the pickled config under the submitit launcher).

Signal: USR2 by default, the one the submitit launcher asks SLURM for (``--signal=USR2@<signal_delay_s>``) and one
NCCL leaves alone; with ``sbatch`` write ``#SBATCH --signal=USR2@120`` (no ``B:``, so that the ``srun`` tasks get it).
Outside SLURM the same signal (``kill -USR2 <pid>``) saves and stops the run, which then says how to resume it. The
process exits with status 0 either way (stopped as asked, nothing lost); the run has no ``finished.json`` until it
is resumed to its end.
"""

from __future__ import annotations

import logging
import os
import signal as signals
import subprocess
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised after the checkpoint was saved (and the job requeued): the run ends here without finishing, with exit
    status 0 (it stopped as asked, nothing was lost) and without ``finished.json``; ``message`` says how it resumes."""

    def __init__(self, message: str) -> None:
        log.warning(message)
        super().__init__(0)
        self.message = message


class Requeue(L.Callback):
    """Save, requeue and stop on ``signal`` (a name such as ``"USR2"``), at the end of the batch it arrives in."""

    def __init__(self, signal: str = "USR2") -> None:
        self.signum = signals.Signals[f"SIG{signal.upper().removeprefix('SIG')}"]
        self._received = False
        self._previous: Any = None

    def _note(self, signum: int, frame: Any) -> None:
        self._received = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._received = False
        self._previous = signals.signal(self.signum, self._note)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signals.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        received = self._received
        if trainer.world_size > 1:
            if trainer.global_step % trainer.log_every_n_steps:
                return  # the ranks agree at logging steps only: reading the flag back is a host-device sync
            flag = torch.tensor(float(received), device=pl_module.device)
            received = bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)
        if not received:
            return
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or not hasattr(checkpoint, "save_last_now"):
            raise RuntimeError(f"got {self.signum.name} but the run has no model_checkpoint to save")
        path = checkpoint.save_last_now(trainer)
        job = os.environ.get("SLURM_JOB_ID")
        name = self.signum.name
        if job and trainer.is_global_zero:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            outcome = "requeued" if done.returncode == 0 else f"not requeued by us ({done.stderr.strip()})"
            log.warning(f"{name} at step {trainer.global_step}: saved {path}; SLURM job {job} {outcome}")
        how = f"SLURM job {job} resumes from it when it restarts" if job else f"resume with ckpt_path={path}"
        raise Preempted(f"stopped by {name} at step {trainer.global_step}: saved {path}; {how}")
