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
        trained = checkpoint.get("run_config", {}).get("model", {})
        hint = f" It was trained with model config {trained}." if trained else ""
        raise CheckpointError(
            f"{path} was written by a different model: {'; '.join(details)} weights.{hint} "
            "Use the same experiment/model config it was trained with."
        )


def model_from_checkpoint(path: str | Path, ema: bool = True) -> nn.Module:
    """Rebuild the LightningModule a run saved and load its EMA (default) or raw weights."""
    checkpoint = load_checkpoint(path)
    config = checkpoint.get("run_config")
    if not config or "model" not in config:
        raise CheckpointError(f"{path} has no run_config: it was not written by diffusion_lightning.train")
    model = instantiate(config["model"], _convert_="all")
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
