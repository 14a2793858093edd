"""The command Lightning's DDP launcher starts the other local ranks with, patched for Hydra apps (imported by the
training entry for its side effect)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.strategies.launchers import subprocess_script as _subprocess_launcher


def rank_command(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning's DDP launcher starts local rank ``local_rank`` > 0 with: this job's own overrides in
    Hydra's run mode, in this job's run folder, writing no second config. Lightning's own re-runs ``sys.argv``, which
    for a multirun (``-m``) is the whole sweep: every rank would start another sweep in another folder."""
    job = HydraConfig.get()
    command = [sys.executable, "-m", "diffusion_lightning.train", *job.overrides.task,
               f"hydra.run.dir={job.runtime.output_dir}", f"hydra.job.name=train_ddp_process_{local_rank}",
               "hydra.output_subdir=null"]  # fmt: skip
    return command, hydra.utils.get_original_cwd()


_subprocess_launcher._hydra_subprocess_cmd = rank_command


_subprocess_launcher._hydra_subprocess_cmd = rank_command
