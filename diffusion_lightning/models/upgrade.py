"""Checkpoints of earlier formats in today's terms, so that they rebuild, sample and resume as they did.

Format 1 (before the denoiser contract, issue 14) and format 2 (before recipes were compositions, issue 29) are
upgraded in place by :func:`upgrade_checkpoint`, which the checkpoint loader and every model's ``on_load_checkpoint``
call; it is idempotent (it sets the format it reached).
"""

from __future__ import annotations

import json
from typing import Any

#: Written into every checkpoint; 1 (absent) = before the denoiser contract (issue 14), 2 = before recipes were
#: compositions (issue 29: first stage, teacher and condition as components).
CHECKPOINT_FORMAT = 3
LATENT_SPACE = "diffusion_lightning.models.LatentSpace"


def upgrade_run_config(config: dict[str, Any], checkpoint_format: int) -> dict[str, Any]:
    """Format 1 -> 2: the model took ``lr``, ``weight_decay``, ``adam_betas`` and ``warmup_steps`` (now the
    ``optimizer`` / ``lr_scheduler`` partials), and the linear schedule ran from 1e-4 to 0.02 for every T (now scaled by
    1000 / T as in the improved-DDPM code unless its ends are given: they are pinned)."""
    if checkpoint_format >= 2:
        return config
    model = dict(config["model"])
    if "lr" in model:
        betas = model.pop("adam_betas", (0.9, 0.999))
        model["optimizer"] = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": model.pop("lr"),
                              "betas": list(betas), "weight_decay": model.pop("weight_decay", 0.0)}
        model["lr_scheduler"] = {"_target_": "diffusion_lightning.models.lr_schedules.linear_warmup",
                                 "_partial_": True, "warmup_steps": model.pop("warmup_steps", 5000)}
    target = str(model.get("_target_", ""))
    default_schedule = "cosine" if target.endswith("ImprovedDDPM") else "linear"
    if model.get("beta_schedule", default_schedule) == "linear" and not model.get("beta_kwargs"):
        model["beta_kwargs"] = {"beta_start": 1e-4, "beta_end": 0.02}
    return {**config, "model": model}


def compose_model_config(model: dict[str, Any], rebuild_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Format 2 -> 3 of one model config and the ``rebuild_kwargs`` stored beside it, as one config that rebuilds the
    model without other files: ``LatentDiffusion`` becomes DDPM on a :class:`~.first_stage.LatentSpace` (from the stored
    stage-1 config), a student's ``teacher_ckpt`` / ``teacher_config`` becomes its ``teacher`` config, and the warm-up
    schedule is named where it now lives (``models.lr_schedules``)."""
    model, rebuild = dict(model), dict(rebuild_kwargs or {})
    if str(model.get("_target_", "")).endswith("LatentDiffusion"):
        stage1 = rebuild.pop("first_stage_config", None) or model.get("first_stage_config")
        stage1 = json.loads(stage1) if isinstance(stage1, str) else stage1
        model["_target_"] = "diffusion_lightning.models.DDPM"
        model["first_stage"] = {"_target_": LATENT_SPACE, "net": stage1["net"],
                                "scale_batches": model.get("scale_batches", 16)}  # s: from the state dict
        for key in ("first_stage_ckpt", "first_stage_config", "scale_factor", "scale_batches"):
            model.pop(key, None)
            rebuild.pop(key, None)
    if "teacher_ckpt" in model or "teacher_config" in model:
        teacher = rebuild.pop("teacher_config", None) or model.get("teacher_config")
        teacher = json.loads(teacher) if isinstance(teacher, str) else teacher
        for key in ("teacher_ckpt", "teacher_config"):
            model.pop(key, None)
            rebuild.pop(key, None)
        if teacher is not None:
            model["teacher"] = compose_model_config(teacher["model"], teacher.get("rebuild_kwargs"))
    schedule = model.get("lr_scheduler")
    if isinstance(schedule, dict) and schedule.get("_target_") == "diffusion_lightning.models.base.linear_warmup":
        model["lr_scheduler"] = {**schedule, "_target_": "diffusion_lightning.models.lr_schedules.linear_warmup"}
    return {**model, **rebuild}


def upgrade_state_dict(state: dict[str, Any]) -> None:
    """Format 2 -> 3 of a state dict, in place: latent diffusion's ``scale_factor`` moves into its first stage, and
    the stage-1 loss's ``logvar`` (no part of encoding or decoding) is dropped; at any depth (a teacher's)."""
    for key in [k for k in state if k == "scale_factor" or k.endswith(".scale_factor")]:
        prefix = key[: -len("scale_factor")]
        if any(k.startswith(prefix + "first_stage.") for k in state):
            state[prefix + "first_stage.scale_factor"] = state.pop(key)
    for key in [k for k in state if k.endswith("first_stage.logvar")]:
        del state[key]


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` (a loaded dict) in today's format, in place; returned for convenience."""
    old = int(checkpoint.get("format", 1))
    if old >= CHECKPOINT_FORMAT:
        return checkpoint
    config = checkpoint.get("run_config")
    if config and "model" in config:
        config = upgrade_run_config(config, old)
        if old < 3:
            config = {**config, "model": compose_model_config(config["model"], checkpoint.pop("rebuild_kwargs", None))}
        checkpoint["run_config"] = config
    if old < 3:
        for key in ("state_dict", "current_model_state"):
            if isinstance(checkpoint.get(key), dict):
                upgrade_state_dict(checkpoint[key])
    checkpoint["format"] = CHECKPOINT_FORMAT
    return checkpoint
