"""Training entry: ``python -m diffusion_lightning.train experiment=ddpm_fmnist [key=value ...]``.

A two-stage experiment names the run it builds on (:mod:`.prior_stages`): latent diffusion (``ldm_*``) its autoencoder
in ``first_stage``, progressive distillation, consistency distillation and tuning (``pd_*``, ``cd_*``, ``ect_*``) its
teacher in ``teacher``; with the component's checkpoint (``model.first_stage.path``, ``model.teacher.path``) null the
newest finished run of that experiment is reused, or trained first in its own run folder.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from . import launcher  # noqa: F401 - patches Lightning's DDP launcher for Hydra apps
from .checkpoint import check_compatible, check_resume_settings, check_same_recipe, load_checkpoint
from .errors import UserError, run_entry
from .models import DiffusionModel
from .prior_stages import FINISHED, data_key, fill_prior_stages
from .run_folder import (
    check_run_folder,
    continue_in,
    drop_empty_run,
    record_branch,
    resolve_ckpt_path,
    resumes_its_run,
    run_folder_of,
)
from .utils import run_or_exit

log = logging.getLogger(__name__)

# The model summary sizes parameters at 32 bits under bf16-mixed, which is right (they are float32): not a warning.
warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary")
# The autoencoder (manual optimisation) is checkpointed after its step, as every model here: what it warns about.
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
# Latent diffusion keeps its frozen first stage in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# Lightning's note that srun exists but this process was not started by it: runs on SLURM go through Hydra's submitit
# launcher (or sbatch), which sets the job's environment; a local run is no mistake.
warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
# A resume continues in its run's own checkpoints/ (it exists, by design), or a branch starts a new one: not news.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
warnings.filterwarnings("ignore", message=r"The dirpath has changed from .* therefore")
# A deprecation inside Lightning's own code (lightning/pytorch/utilities/_pytree.py), nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class _DropThirdPartyNotes(logging.Filter):
    """Lightning's advertisements for its cloud products and its note that our own model summary replaces its
    default one: start-up lines that tell a user nothing about the run."""

    NOTES = ("💡 Tip:", "Trainer already configured with model summary callbacks")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTES)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropThirdPartyNotes())


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every non-null entry of a config group of objects (callbacks, loggers)."""
    return [instantiate(c) for c in (group or {}).values() if c is not None]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flat(v, key + "/")
        else:
            out[key] = v if isinstance(v, int | float | str | bool) or v is None else str(v)
    return out


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build data, model, callbacks, loggers and trainer from ``cfg`` and fit (training a missing first stage
    before, testing after where ``cfg.test``)."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # fails here, before any model is built, when the data is missing
    if fill_prior_stages(cfg, train) and cfg.get("seed") is not None:  # a null component path: train or reuse one
        L.seed_everything(cfg.seed, workers=True)  # stage 2 draws as it would without a stage 1 before it
    with open_dict(cfg):
        cfg.ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    checkpoint, branched_from = load_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None, None
    if checkpoint is not None:
        check_same_recipe(checkpoint, cfg, cfg.ckpt_path)
        run, here = run_folder_of(cfg.ckpt_path), Path(cfg.paths.output_dir).resolve()
        changes = check_resume_settings(checkpoint, cfg, cfg.ckpt_path, bool(cfg.get("branch")) and run != here)
        if run is None or run != here and (changes or not resumes_its_run(cfg.ckpt_path, checkpoint, run,
                                                                           bool(cfg.get("branch")))):
            branched_from = (cfg.ckpt_path, int(checkpoint.get("global_step", 0)), changes)  # a new run folder
        elif run != here:
            continue_in(run, cfg)
    model = instantiate(cfg.model, _convert_="all")
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    model.nonfinite = cfg.get("nonfinite", "stop")
    if model.nonfinite not in ("stop", "skip") or (model.nonfinite == "skip" and not model.automatic_optimization):
        raise UserError(f"nonfinite={model.nonfinite}: use stop, or skip (models with automatic optimization only)")
    if checkpoint is not None:
        check_compatible(checkpoint, model, cfg.ckpt_path)
        del checkpoint  # Lightning loads it again in fit

    callbacks = _instantiate_all(cfg.get("callbacks"))
    if isinstance(model, DiffusionModel):  # what the grids and metrics will sample with fails now, not at their turn
        for sampler in [None, *(c.sampler for c in callbacks if getattr(c, "sampler", None) is not None)]:
            model.check_sampling(sampler)
    check_run_folder(Path(cfg.paths.output_dir), model)
    if branched_from is not None:
        record_branch(cfg.paths.output_dir, *branched_from)

    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(_flat(model.run_config))
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except FloatingPointError as e:
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        raise FloatingPointError(f"{e} Last good checkpoint: {last} (resume with ckpt_path=...)") from None
    test_metrics = trainer.test(model, datamodule=datamodule, verbose=True) if cfg.get("test") else None
    last = getattr(trainer.checkpoint_callback, "last_model_path", "")
    if trainer.is_global_zero and not trainer.interrupted and last:
        info = {"checkpoint": str(Path(last).resolve()), "global_step": trainer.global_step,
                "experiment": cfg.get("run_name"), "data": data_key(cfg.data),
                "test": test_metrics[0] if test_metrics else None}
        (Path(cfg.paths.output_dir) / FINISHED).write_text(json.dumps(info, indent=1) + "\n")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # the next job of a multirun in this process starts its own ranks and process group
        trainer.strategy.barrier("run_finished")
        torch.distributed.destroy_process_group()
    return {"trainer": trainer, "model": model, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    fresh, environ = Path(cfg.paths.output_dir), dict(os.environ)
    try:
        result = run_or_exit(train, cfg)  # a failed run's empty folder is removed there
    finally:
        if Path(cfg.paths.output_dir) != fresh:  # resumed in the checkpoint's run folder (continue_in)
            drop_empty_run(fresh, Path(cfg.paths.log_dir))
        # Lightning's DDP launcher leaves LOCAL_RANK, MASTER_PORT, ... set: the next job of a multirun in this
        # process would take them for an external launcher and wait for ranks that nobody starts
        os.environ.clear()
        os.environ.update(environ)
    if not result["trainer"].is_global_zero:
        return
    grid = next((c for c in result["trainer"].callbacks if hasattr(c, "last_path")), None)
    print(f"run folder: {cfg.paths.output_dir}")
    if grid is not None and grid.last_path is not None:
        print(f"sample grid: {grid.last_path}")


if __name__ == "__main__":
    run_entry(main, "train")
