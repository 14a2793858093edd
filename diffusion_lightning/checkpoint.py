"""Safe checkpoint loading: ``weights_only=True`` and clear errors for foreign or mismatched files."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from .errors import CheckpointError


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path} as a diffusion-lightning checkpoint (corrupt, truncated, or a foreign "
            f"file that needs unsafe unpickling): {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def check_compatible(checkpoint: dict[str, Any], model: nn.Module, path: str | Path = "checkpoint") -> None:
    """Raise a clear error if the checkpoint's weights do not fit ``model`` (other architecture)."""
    own = model.state_dict()
    theirs = checkpoint["state_dict"]
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shapes = [k for k in own.keys() & theirs.keys() if tuple(own[k].shape) != tuple(theirs[k].shape)]
    if missing or unexpected or shapes:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            shape_pair = f"{tuple(theirs[k].shape)} vs {tuple(own[k].shape)}"
            details.append(f"{len(shapes)} of other shape (e.g. {k}: {shape_pair})")
        run_config = checkpoint.get("run_config") or {}
        experiment, target = run_config.get("run_name"), (run_config.get("model") or {}).get("_target_")
        if experiment:
            hint = (f" It was written by experiment={experiment} ({target}): resume it with experiment={experiment} "
                    "and the overrides of that run (its .hydra/overrides.yaml).")  # fmt: skip
        else:
            hint = " Use the same experiment/model config it was trained with."
        raise CheckpointError(f"{path} was written by a different model: {'; '.join(details)} weights.{hint}")


def upgrade_run_config(config: dict[str, Any], checkpoint_format: int) -> dict[str, Any]:
    """The run config of a checkpoint in today's terms, so that an old checkpoint rebuilds the same model.

    Format 1 (before the denoiser contract, issue 14): the model took ``lr``, ``weight_decay``, ``adam_betas`` and
    ``warmup_steps`` (now the ``optimizer`` / ``lr_scheduler`` partials), and the linear schedule ran from 1e-4 to
    0.02 for every T (now scaled by 1000 / T as in the improved-DDPM code unless its ends are given: they are pinned).
    """
    if checkpoint_format >= 2:
        return config
    model = dict(config["model"])
    if "lr" in model:
        betas = model.pop("adam_betas", (0.9, 0.999))
        model["optimizer"] = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": model.pop("lr"),
                              "betas": list(betas), "weight_decay": model.pop("weight_decay", 0.0)}
        model["lr_scheduler"] = {"_target_": "diffusion_lightning.models.base.linear_warmup", "_partial_": True,
                                 "warmup_steps": model.pop("warmup_steps", 5000)}
    target = str(model.get("_target_", ""))
    default_schedule = "cosine" if target.endswith("ImprovedDDPM") else "linear"
    if model.get("beta_schedule", default_schedule) == "linear" and not model.get("beta_kwargs"):
        model["beta_kwargs"] = {"beta_start": 1e-4, "beta_end": 0.02}
    return {**config, "model": model}


def model_from_checkpoint(path: str | Path, ema: bool = True, generative: bool = True) -> nn.Module:
    """Rebuild the LightningModule a run saved and load its EMA (default) or raw weights; with ``generative`` refuse a
    model that does not sample (a stage-1 autoencoder)."""
    checkpoint = load_checkpoint(path)
    config = checkpoint.get("run_config")
    if not config or "model" not in config:
        raise CheckpointError(f"{path} has no run_config: it was not written by diffusion_lightning.train")
    if generative and str(config["model"].get("_target_", "")).endswith(".Autoencoder"):
        raise CheckpointError(
            f"{path} is a stage-1 autoencoder: it reconstructs images but does not sample them. Sample and evaluate "
            "the checkpoint of the latent diffusion run trained on it (ldm_*); its test PSNR/SSIM/rFID are in the "
            "run folder's finished.json"
        )
    config = upgrade_run_config(config, int(checkpoint.get("format", 1)))
    # e.g. latent diffusion: its first stage from the stored config, not the stage-1 file it was trained from
    model = instantiate(config["model"], _convert_="all", **checkpoint.get("rebuild_kwargs", {}))
    state = checkpoint["state_dict"]
    if not ema:
        if "current_model_state" not in checkpoint:
            raise CheckpointError(f"{path} holds no separate raw weights (trained without EMA): use ema=true")
        state = checkpoint["current_model_state"]
    check_compatible({**checkpoint, "state_dict": state}, model, path)
    model.load_state_dict(state)
    model.run_config = config
    model.checkpoint_meta = {"path": str(path), "global_step": checkpoint.get("global_step"), "ema": ema}
    return model.eval()
