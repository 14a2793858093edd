"""Two-stage experiments: the run a recipe's component is built from (latent diffusion's autoencoder in
``first_stage``, a student's teacher in ``teacher``). With the component's ``path`` null (``model.first_stage.path``,
``model.teacher.path``) the newest finished run of that experiment on the same data is reused, or trained first in
its own run folder."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import CONF_DIR, UserError

#: Written into a run folder when training ran to its end: the run's last checkpoint and what it was trained on.
FINISHED = "finished.json"
#: The run-config keys that name a prior run; each is also the model's component slot whose ``path`` takes its
#: checkpoint.
STAGES = ("first_stage", "teacher")


def data_key(data: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """What makes two runs' data the same data set for a first stage: the data module, its root and image size."""
    return {k: data.get(k) for k in ("_target_", "root", "image_size")}


def find_finished_run(log_dir: str | Path, experiment: str, data: DictConfig) -> dict[str, Any] | None:
    """The ``finished.json`` of the newest finished run of ``experiment`` under ``log_dir``/train on the same data
    whose last checkpoint exists (its ``checkpoint`` and ``global_step``)."""
    for marker in sorted(Path(log_dir).glob(f"train/{experiment}/*/{FINISHED}"), reverse=True):
        info = json.loads(marker.read_text())
        if info.get("data") == data_key(data) and Path(info["checkpoint"]).is_file():
            return info
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


def ensure_prior_run(cfg: DictConfig, key: str, train: Callable[[DictConfig], Any]) -> str:
    """The checkpoint of the run a two-stage run builds on (``key``: ``first_stage`` or ``teacher``): the newest
    finished run of ``cfg[key].experiment`` on the same data, else one trained now by ``train``."""
    experiment, what = cfg[key].experiment, key.replace("_", " ")
    if info := find_finished_run(cfg.paths.log_dir, experiment, cfg.data):
        print(f"{what}: reusing {info['checkpoint']} (a finished {experiment} run on this data, trained for "
              f"{info.get('global_step')} steps; model.{key}.path=... picks another)")
        return str(info["checkpoint"])
    if not cfg[key].get("train", True):
        raise UserError(f"no finished {experiment} run on this data under {cfg.paths.log_dir}/train: train one first "
                        f"(make train EXP={experiment}) or set model.{key}.path=<its checkpoints/last.ckpt>")
    prior = prior_run_config(cfg, key)
    out = Path(prior.paths.output_dir)
    print(f"{what}: no finished {experiment} run on this data under {cfg.paths.log_dir}/train: training it in {out}")
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(prior, out / ".hydra" / "config.yaml", resolve=False)
    handler = logging.FileHandler(out / "train.log")  # the prior run's own log, as its own invocation would write
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        train(prior)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    if not (out / FINISHED).is_file():
        raise RuntimeError(f"the {what} in {out} finished without a last checkpoint")
    found = json.loads((out / FINISHED).read_text())["checkpoint"]
    print(f"{what}: done, {found}; now the second stage")
    return found


def fill_prior_stages(cfg: DictConfig, train: Callable[[DictConfig], Any]) -> bool:
    """Set ``model.<slot>.path`` of every component whose path is null and whose prior run the config names, reusing
    or (with ``train``) training that run; True if any was set."""
    done = False
    for key in STAGES:
        slot = cfg.model.get(key)
        if cfg.get(key) and isinstance(slot, DictConfig) and "path" in slot and not slot.path:
            checkpoint = ensure_prior_run(cfg, key, train)
            with open_dict(cfg):
                cfg.model[key].path = checkpoint
            done = True
    return done
