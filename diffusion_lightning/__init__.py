"""diffusion-lightning: PyTorch Lightning + Hydra experiment framework for image diffusion models."""

import os

# OpenMP threads (torch's CPU kernels; GNU libgomp) spin 300,000 iterations at each barrier before they sleep. When
# another busy process shares the cores the spinning threads take its time slices and both collapse; 3,000 spins
# keep most of the throughput under that contention for a few percent alone (docs/results/speed.md, "two processes on
# the 2 cores").
# Effective where this package is imported before torch (the entry points); set GOMP_SPINCOUNT yourself to override.
os.environ.setdefault("GOMP_SPINCOUNT", "3000")

from omegaconf import OmegaConf  # noqa: E402

# ${dl_cwd:} is the directory a run was started from. Unlike ${hydra:runtime.cwd} it resolves before
# HydraConfig exists (multirun resolves hydra.sweep.dir first), and unlike $PWD it is right for
# processes started by other programs.
OmegaConf.register_new_resolver("dl_cwd", os.getcwd, replace=True)


def run_id(stamp: str) -> str:
    """``${dl_run_id:${now:...}}``, the name of a run folder: ``slurm-<job id>[.<step id>]`` inside a SLURM job, so
    that every rank ``srun`` starts and every restart of a requeued job agree on it; the time ``stamp`` elsewhere."""
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
    return stamp if not job else f"slurm-{job}" + (f".{step}" if step else "")


OmegaConf.register_new_resolver("dl_run_id", run_id, replace=True)


def cpu_precision() -> str:
    """``bf16-mixed`` where the CPU computes in bfloat16 natively (AVX512-BF16 or AMX; docs/performance.md has the
    measured gain), else ``32-true`` (emulated bfloat16 is slower than float32). ``${dl_cpu_precision:}`` in
    ``conf/trainer/cpu.yaml``."""
    import torch

    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # older torch: no way to tell, stay exact
        native = False
    return "bf16-mixed" if native else "32-true"


OmegaConf.register_new_resolver("dl_cpu_precision", cpu_precision, replace=True)


def distill_steps(start_steps: int, end_steps: int, steps_per_round: int) -> int:
    """``${dl_distill_steps:start,end,per_round}``: the optimizer steps of all progressive-distillation rounds."""
    from .models.progressive_distillation import distillation_steps

    return distillation_steps(start_steps, end_steps, steps_per_round)


OmegaConf.register_new_resolver("dl_distill_steps", distill_steps, replace=True)
