"""Training entry: ``python -m diffusion_lightning.train experiment=ddpm_fmnist [key=value ...]``."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .checkpoint import check_compatible, load_checkpoint
from .utils import run_or_exit

log = logging.getLogger(__name__)

# The model summary sizes parameters at 32 bits under bf16-mixed, which is right (they are float32): not a warning.
warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary")


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
    """Build data, model, callbacks, loggers and trainer from ``cfg`` and fit."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # fails here, before any model is built, when the data is missing
    model = instantiate(cfg.model, _convert_="all")
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.get("ckpt_path"):
        check_compatible(load_checkpoint(cfg.ckpt_path), model, cfg.ckpt_path)

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
    return {"trainer": trainer, "model": model, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    result = run_or_exit(train, cfg)
    if not result["trainer"].is_global_zero:
        return
    grid = next((c for c in result["trainer"].callbacks if hasattr(c, "last_path")), None)
    print(f"run folder: {cfg.paths.output_dir}")
    if grid is not None and grid.last_path is not None:
        print(f"sample grid: {grid.last_path}")


if __name__ == "__main__":
    main()
