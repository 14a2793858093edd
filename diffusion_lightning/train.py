"""Training entry: ``python -m diffusion_lightning.train experiment=ddpm_fmnist [key=value ...]``.

A two-stage experiment names the run it builds on: latent diffusion (``ldm_*``) its autoencoder in ``first_stage``,
progressive distillation, consistency distillation and tuning (``pd_*``, ``cd_*``, ``ect_*``) its teacher in
``teacher``; with the model's checkpoint key for it
(``model.first_stage_ckpt``, ``model.teacher_ckpt``) null the newest finished run of that experiment is reused, or
trained first in its own run folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.strategies.launchers import subprocess_script as _subprocess_launcher
from omegaconf import DictConfig, OmegaConf, open_dict

from .checkpoint import check_compatible, load_checkpoint
from .errors import UserError, suggest_on_failure
from .utils import run_or_exit

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
#: Written into a run folder when training ran to its end: the run's last checkpoint and what it was trained on.
FINISHED = "finished.json"
#: The runs a two-stage experiment builds on: its config key -> the model argument that takes their checkpoint.
STAGES = {"first_stage": "first_stage_ckpt", "teacher": "teacher_ckpt"}

# The model summary sizes parameters at 32 bits under bf16-mixed, which is right (they are float32): not a warning.
warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary")
# The autoencoder (manual optimisation) is checkpointed after its step, as every model here: what it warns about.
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
# Latent diffusion keeps its frozen first stage in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# A deprecation inside Lightning's own code (lightning/pytorch/utilities/_pytree.py), nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class _DropThirdPartyNotes(logging.Filter):
    """Lightning's advertisements for its cloud products and its note that our own model summary replaces its
    default one: start-up lines that tell a user nothing about the run."""

    NOTES = ("💡 Tip:", "Trainer already configured with model summary callbacks")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTES)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropThirdPartyNotes())


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


def _data_key(data: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """What makes two runs' data the same data set for a first stage: the data module, its root and image size."""
    return {k: data.get(k) for k in ("_target_", "root", "image_size")}


def find_finished_run(log_dir: str | Path, experiment: str, data: DictConfig) -> Path | None:
    """The last checkpoint of the newest finished run of ``experiment`` under ``log_dir``/train on the same data."""
    for marker in sorted(Path(log_dir).glob(f"train/{experiment}/*/{FINISHED}"), reverse=True):
        info = json.loads(marker.read_text())
        if info.get("data") == _data_key(data) and Path(info["checkpoint"]).is_file():
            return Path(info["checkpoint"])
    return None


def prior_run_config(cfg: DictConfig, key: str = "first_stage") -> DictConfig:
    """The config of the run named by ``cfg[key]`` (``first_stage``, ``teacher``): its experiment with this run's
    data root, paths, seed, accelerator and devices (and under DDP a strategy that allows parameters without
    gradients), then ``cfg[key].overrides``; its run folder is ``<log_dir>/train/<experiment>/<time>``."""
    experiment = cfg[key].experiment
    out = Path(cfg.paths.log_dir) / "train" / experiment / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    overrides = [
        f"experiment={experiment}", f"run_name={experiment}", f"paths.root_dir={cfg.paths.root_dir}",
        f"paths.log_dir={cfg.paths.log_dir}", f"paths.output_dir={out}", f"data.root={cfg.data.root}",
        f"seed={cfg.seed}", f"trainer.accelerator={cfg.trainer.accelerator}", f"trainer.devices={cfg.trainer.devices}",
    ]  # fmt: skip
    if str(cfg.trainer.get("strategy", "")).startswith("ddp"):
        # the autoencoder's discriminator takes no part in its steps before disc_start: DDP must allow unused ones
        overrides += ["++trainer.strategy=ddp_find_unused_parameters_true",
                      f"++trainer.num_nodes={cfg.trainer.get('num_nodes', 1)}"]
    overrides += list(cfg[key].get("overrides", []))
    if GlobalHydra.instance().is_initialized():  # inside the @hydra.main entry: its config search path
        return compose("train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def ensure_prior_run(cfg: DictConfig, key: str = "first_stage") -> str:
    """The checkpoint of the run a two-stage run builds on (``key``: ``first_stage`` or ``teacher``): the newest
    finished run of ``cfg[key].experiment`` on the same data, else one trained now."""
    experiment, what = cfg[key].experiment, key.replace("_", " ")
    if found := find_finished_run(cfg.paths.log_dir, experiment, cfg.data):
        print(f"{what}: reusing {found} (a finished {experiment} run on this data; model.{STAGES[key]}=... picks "
              "another)")
        return str(found)
    if not cfg[key].get("train", True):
        raise UserError(f"no finished {experiment} run on this data under {cfg.paths.log_dir}/train: train one first "
                        f"(make train EXP={experiment}) or set model.{STAGES[key]}=<its checkpoints/last.ckpt>")
    prior = prior_run_config(cfg, key)
    out = Path(prior.paths.output_dir)
    print(f"{what}: no finished {experiment} run on this data under {cfg.paths.log_dir}/train: training it in {out}")
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(prior, out / ".hydra" / "config.yaml", resolve=False)
    train(prior)
    if not (out / FINISHED).is_file():
        raise RuntimeError(f"the {what} in {out} finished without a last checkpoint")
    found = json.loads((out / FINISHED).read_text())["checkpoint"]
    print(f"{what}: done, {found}; now the second stage")
    return found


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build data, model, callbacks, loggers and trainer from ``cfg`` and fit (training a missing first stage
    before, testing after where ``cfg.test``)."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # fails here, before any model is built, when the data is missing
    for key, model_key in STAGES.items():
        if cfg.get(key) and model_key in cfg.model and not cfg.model[model_key]:  # null: train or reuse one
            checkpoint = ensure_prior_run(cfg, key)
            with open_dict(cfg):
                cfg.model[model_key] = checkpoint
            if cfg.get("seed") is not None:
                L.seed_everything(cfg.seed, workers=True)  # stage 2 draws as it would without a stage 1 before it
    with open_dict(cfg):
        cfg.ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    if cfg.get("ckpt_path") and (run := run_folder_of(cfg.ckpt_path)) and run != Path(cfg.paths.output_dir).resolve():
        continue_in(run, cfg)
    model = instantiate(cfg.model, _convert_="all")
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    model.nonfinite = cfg.get("nonfinite", "stop")
    if model.nonfinite not in ("stop", "skip") or (model.nonfinite == "skip" and not model.automatic_optimization):
        raise UserError(f"nonfinite={model.nonfinite}: use stop, or skip (models with automatic optimization only)")
    if cfg.get("ckpt_path"):
        check_compatible(load_checkpoint(cfg.ckpt_path), model, cfg.ckpt_path)

    check_run_folder(Path(cfg.paths.output_dir), model)

    callbacks = _instantiate_all(cfg.get("callbacks"))
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
                "experiment": cfg.get("run_name"), "data": _data_key(cfg.data),
                "test": test_metrics[0] if test_metrics else None}
        (Path(cfg.paths.output_dir) / FINISHED).write_text(json.dumps(info, indent=1) + "\n")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # the next job of a multirun in this process starts its own ranks and process group
        trainer.strategy.barrier("run_finished")
        torch.distributed.destroy_process_group()
    return {"trainer": trainer, "model": model, "datamodule": datamodule}


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


def drop_empty_run(folder: Path) -> bool:
    """Remove a run folder that holds nothing but Hydra's config copy and the log (a run that failed before it wrote
    a checkpoint, a grid or a curve); True if it was removed."""
    if not folder.is_dir():
        return False
    for path in folder.iterdir():
        if path.name not in (".hydra", "train.log") and (path.is_file() or any(p.is_file() for p in path.rglob("*"))):
            return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    fresh, environ = Path(cfg.paths.output_dir), dict(os.environ)
    try:
        result = run_or_exit(train, cfg)
    except BaseException:
        if drop_empty_run(fresh):
            print(f"(removed the run folder {fresh}: the run wrote nothing)", file=sys.stderr)
        raise
    finally:
        if Path(cfg.paths.output_dir) != fresh:  # resumed in the checkpoint's run folder (continue_in)
            drop_empty_run(fresh)
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
    suggest_on_failure(main, "train")
