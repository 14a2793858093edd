"""Run folders: what to resume from (``ckpt_path``), resuming in the checkpoint's own folder, and the checks and
clean-up of a run's folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, open_dict

from .errors import UserError

log = logging.getLogger(__name__)


def check_run_folder(folder: Path, model: L.LightningModule) -> None:
    """Fail before training when the run folder cannot be written or its disk cannot hold two checkpoints (the one
    being written beside the last one): eight bytes per parameter byte (weights, EMA and Adam's two moments, twice)
    and 64 MiB for grids and logs."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"  # one per process: ranks probe the same folder at once
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the run folder {folder} ({e.strerror or e}): point paths.log_dir (or "
                        "paths.output_dir) at a writable folder") from None  # fmt: skip
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    need, free = 8 * params + 64 * 2**20, shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"{free / 2**20:.0f} MiB free on the disk of {folder}, and a run of this model needs about "
                        f"{need / 2**20:.0f} MiB for its checkpoints: free space or point paths.log_dir at another "
                        "disk")  # fmt: skip


def newest_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint of a run folder (or of its ``checkpoints/``): the last one written, by time."""
    folder = Path(folder)
    found = [*folder.glob("checkpoints/*.ckpt"), *folder.glob("*.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """What to resume from: ``last`` is the newest checkpoint of this run's own folder, or a fresh start when it has
    none (a job that may be restarted: always pass it); a run folder is its newest checkpoint; a file is itself.
    Unset in a restarted SLURM job (``SLURM_RESTART_COUNT`` > 0) it is ``last``: a requeued job resumes by itself."""
    if ckpt_path is None and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        ckpt_path = "last"
    if ckpt_path == "last":
        found = newest_checkpoint(output_dir)
        log.info(f"ckpt_path=last: resuming from {found}" if found else
                 f"ckpt_path=last: no checkpoint in {output_dir} yet, starting fresh")  # fmt: skip
        return str(found) if found else None
    if ckpt_path is not None and Path(ckpt_path).is_dir():
        if (found := newest_checkpoint(ckpt_path)) is None:
            raise UserError(f"ckpt_path={ckpt_path} is a folder without checkpoints (*.ckpt, checkpoints/*.ckpt)")
        log.info(f"ckpt_path={ckpt_path}: resuming from its newest checkpoint, {found}")
        return str(found)
    return ckpt_path


def run_folder_of(ckpt_path: str | Path) -> Path | None:
    """The run folder a checkpoint was written into (``<run>/checkpoints/<name>.ckpt`` beside ``<run>/.hydra``), or
    None for a checkpoint outside a run folder."""
    run = Path(ckpt_path).resolve().parent.parent
    return run if (run / ".hydra").is_dir() and Path(ckpt_path).resolve().parent.name == "checkpoints" else None


def resumes_its_run(ckpt_path: str | Path, checkpoint: dict, run: Path, branch: bool) -> bool:
    """Whether a resume from ``ckpt_path`` (loaded: ``checkpoint``) of run folder ``run`` continues in that folder: yes
    when it is the newest checkpoint of its run (by global step); else, so that the run's later checkpoints, grids and
    ``finished.json`` are never overwritten, it is refused, or with ``branch`` it starts a new run folder (recorded
    there in ``branched_from.json`` by :func:`record_branch`)."""
    newest = newest_checkpoint(run)
    step = int(checkpoint.get("global_step", 0))
    newest_step = step if newest is None or newest.resolve() == Path(ckpt_path).resolve() else checkpoint_step(newest)
    if step >= newest_step:
        return True
    if not branch:
        raise UserError(f"ckpt_path={ckpt_path} is step {step} of {run}, whose newest checkpoint is step {newest_step} "
                        f"({newest.name}): resuming in that run would overwrite its later checkpoints. Resume the run "
                        f"from its newest (ckpt_path={run}), or start a new run folder from this checkpoint with "
                        "branch=true")  # fmt: skip
    log.info(f"branching from {ckpt_path} (step {step}) into a new run folder; {run} is left as it is")
    return False


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was written at (memory-mapped: the weights are not read)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))
    except Exception:  # an unreadable checkpoint (cut off, foreign) counts as no later step  # noqa: BLE001
        return -1


def record_branch(output_dir: str | Path, ckpt_path: str | Path, step: int, changes: dict | None = None) -> None:
    """``branched_from.json`` in a run folder started from a checkpoint of another run: the checkpoint, its step and
    the settings changed from its run's (``{key: {"then": ..., "now": ...}}``)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "branched_from.json").write_text(json.dumps(
        {"checkpoint": str(Path(ckpt_path).resolve()), "global_step": step, "changed": changes or {}}, indent=1
    ) + "\n")


def continue_in(run: Path, cfg: DictConfig) -> None:
    """Resume in the run folder the checkpoint came from: its checkpoints, grids, TensorBoard curves (the same event
    folder, steps continuing from the checkpoint's) and ``train.log`` (appended) go on there. The folder Hydra made for
    this invocation keeps only its config, copied to ``<run>/.hydra/resumed_<time>/``, and is removed at the end."""
    fresh = Path(cfg.paths.output_dir)
    if (fresh / ".hydra").is_dir():
        shutil.copytree(fresh / ".hydra", run / ".hydra" / f"resumed_{fresh.name}", dirs_exist_ok=True)
    handler = logging.FileHandler(run / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)
    log.info(f"resuming in the run folder of the checkpoint, {run}: its checkpoints, grids and curves continue there")


def drop_empty_run(folder: Path, up_to: Path | None = None) -> bool:
    """Remove a run folder that holds nothing but Hydra's config copy and logs (a run that failed before it wrote a
    checkpoint, a grid, a sample or a curve), and its parents below ``up_to`` that it leaves empty; True if removed."""
    if not folder.is_dir():
        return False
    for path in folder.iterdir():
        kept = path.is_file() or any(p.is_file() for p in path.rglob("*"))
        if kept and path.name != ".hydra" and path.suffix != ".log":
            return False
    shutil.rmtree(folder, ignore_errors=True)
    if up_to is not None:
        up_to, parent = up_to.resolve(), folder.resolve().parent
        while parent != up_to and up_to in parent.parents and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    return True
