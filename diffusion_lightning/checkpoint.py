"""Safe checkpoint loading (``weights_only=True``, clear errors for foreign or mismatched files, older formats
upgraded) and the loaders that build a recipe's components from checkpoints: a teacher (:func:`load_teacher`) and a
latent first stage (:func:`load_first_stage`), as Hydra targets (``model.teacher``, ``model.first_stage``)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .errors import CheckpointError, dotted_keys
from .models.upgrade import upgrade_checkpoint, upgrade_run_config  # noqa: F401 - upgrade_run_config re-exported


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint without running pickled code."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: give a checkpoint file (<run>/checkpoints/last.ckpt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # what torch.save writes; a text, empty or cut-off file is none
        size = path.stat().st_size
        what = "an empty file" if size == 0 else f"{size} bytes"
        raise CheckpointError(f"{path} is not a checkpoint ({what}, not the zip archive torch.save writes, or cut "
                              "off): give a .ckpt file of a run")  # fmt: skip
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any file that is no checkpoint: text, empty, cut off, foreign pickle
        reason = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise CheckpointError(
            f"cannot read {path} as a diffusion-lightning checkpoint (corrupt, truncated, or a foreign "
            f"file that needs unsafe unpickling): {reason[:200]}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return upgrade_checkpoint(checkpoint)


def identity(checkpoint: dict[str, Any]) -> dict[str, str | None]:
    """What wrote a checkpoint (:meth:`~diffusion_lightning.models.run_module.RunModule.identity`): stored since issue
    30; for older ones the recipe read from its run config."""
    if "identity" in checkpoint:
        return checkpoint["identity"]
    target = str(((checkpoint.get("run_config") or {}).get("model") or {}).get("_target_", ""))
    return {"recipe": target.rsplit(".", 1)[-1] or None}


def describe(checkpoint: dict[str, Any]) -> str:
    """``a DDPM checkpoint (experiment=ddpm_fmnist, on LatentSpace, teacher ContinuousDiffusion)``."""
    who = identity(checkpoint)
    parts = [f"experiment={(checkpoint.get('run_config') or {}).get('run_name')}"]
    if who.get("first_stage") == "LatentSpace":
        parts.append("on autoencoder latents")
    if who.get("teacher"):
        parts.append(f"distilled from a {who['teacher']}")
    return f"a {who.get('recipe') or 'unknown'} checkpoint ({', '.join(parts)})"


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


def check_same_recipe(checkpoint: dict[str, Any], cfg: Any, path: str | Path = "checkpoint") -> None:
    """Refuse to resume a checkpoint under another recipe (even one whose network keys match: a DDPM checkpoint under
    a consistency-training experiment would otherwise train on silently), naming both and the experiment to use."""
    theirs, ours = identity(checkpoint).get("recipe"), str(cfg.model.get("_target_", "")).rsplit(".", 1)[-1]
    if theirs and ours and theirs != ours:
        experiment = (checkpoint.get("run_config") or {}).get("run_name")
        raise CheckpointError(
            f"{path} is {describe(checkpoint)} and cannot resume the {ours} recipe "
            f"(experiment={cfg.get('run_name')}): resume it with experiment={experiment}, or start a student from it "
            "with model.teacher.path=..."
        )


#: Settings a resume may change without changing what is trained, or how: when the run stops, validates, logs,
#: draws grids and checkpoints and where it writes; the grids' sampler and guidance; data loading; the accelerator;
#: the components built from other runs, a teacher and a first stage (the run's checkpoint holds their weights, which
#: must fit: :func:`check_compatible`). The global batch (``data.batch_size`` times
#: ``trainer.devices`` times ``trainer.num_nodes``) may be split over another number of processes.
RESUME_MAY_CHANGE = (
    "trainer.max_steps", "trainer.max_epochs", "trainer.val_check_interval", "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches", "trainer.log_every_n_steps", "trainer.enable_progress_bar", "trainer.accelerator",
    "trainer.num_sanity_val_steps", "trainer.default_root_dir", "trainer.enable_model_summary", "callbacks", "logger",
    "paths", "ckpt_path", "branch", "test", "task_name", "nonfinite", "sampler", "guidance", "model.sampler",
    "model.guidance", "model.teacher", "model.first_stage", "first_stage", "teacher", "data.root",
    "data.num_workers", "data.pin_memory", "data.persistent_workers",
    "data.batch_size", "trainer.devices", "trainer.num_nodes",  # compared as the global batch
)  # fmt: skip


def _global_batch(config: dict[str, Any]) -> Any:
    data, trainer = config.get("data") or {}, config.get("trainer") or {}
    parts = (data.get("batch_size"), trainer.get("devices", 1), trainer.get("num_nodes", 1))
    return parts[0] * parts[1] * parts[2] if all(isinstance(p, int) for p in parts) else parts


def resume_changes(checkpoint: dict[str, Any], cfg: Any) -> dict[str, tuple[Any, Any]]:
    """The settings of ``cfg`` that differ from those the checkpoint's run trained with, as {key: (then, now)},
    except :data:`RESUME_MAY_CHANGE` (keys only one side has, from another version of the framework, are skipped)."""
    then = checkpoint.get("run_config") or {}
    now = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    old, new = ({k: v for k, v in dotted_keys(c).items() if not isinstance(v, dict) or not v} for c in (then, now))
    changes = {k: (old[k], new[k]) for k in old.keys() & new.keys()
               if old[k] != new[k] and not any(k == s or k.startswith(s + ".") for s in RESUME_MAY_CHANGE)}
    if then and _global_batch(then) != _global_batch(now):
        changes["global batch (data.batch_size x trainer.devices x trainer.num_nodes)"] = (
            _global_batch(then), _global_batch(now))
    return dict(sorted(changes.items()))


def check_resume_settings(checkpoint: dict[str, Any], cfg: Any, path: str | Path, branch: bool) -> dict[str, Any]:
    """Refuse to continue a run with other data, batch, model or optimisation settings than it trained with (its
    checkpoints would hold a run of two configs), naming what changed; with ``branch`` the change starts a new run
    folder instead, and the changes are returned for its ``branched_from.json``."""
    changes = resume_changes(checkpoint, cfg)
    if changes and not branch:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in list(changes.items())[:4]))
        more = f" (and {len(changes) - 4} more)" if len(changes) > 4 else ""
        raise CheckpointError(
            f"ckpt_path={path} trained with other settings than these: {listed}{more}. Resume with the run's own "
            "settings (its .hydra/overrides.yaml), or start a new run folder from this checkpoint with branch=true"
        )
    return {k: {"then": a, "now": b} for k, (a, b) in changes.items()}


def model_from_checkpoint(path: str | Path, ema: bool = True, generative: bool = True) -> nn.Module:
    """Rebuild the LightningModule a run saved and load its EMA (default) or raw weights; with ``generative`` refuse a
    model that does not sample (a stage-1 autoencoder)."""
    checkpoint = load_checkpoint(path)
    config = checkpoint.get("run_config")
    if not config or "model" not in config:
        raise CheckpointError(f"{path} has no run_config: it was not written by diffusion_lightning.train")
    if generative and identity(checkpoint).get("recipe") == "Autoencoder":
        raise CheckpointError(
            f"{path} is a stage-1 autoencoder: it reconstructs images but does not sample them. Sample and evaluate "
            "the checkpoint of the latent diffusion run trained on it (ldm_*); its test PSNR/SSIM/rFID are in the "
            "run folder's finished.json"
        )
    # a teacher or first stage from the configs stored in the checkpoint, not the files it was trained from
    component_config = {**config["model"], **checkpoint.get("rebuild_kwargs", {})}
    model = instantiate(component_config, _convert_="all")
    state = checkpoint["state_dict"]
    if not ema:
        if "current_model_state" not in checkpoint:
            raise CheckpointError(f"{path} holds no separate raw weights (trained without EMA): use ema=true")
        state = checkpoint["current_model_state"]
    check_compatible({**checkpoint, "state_dict": state}, model, path)
    model.load_state_dict(state)
    model.run_config = config
    model.component_config = component_config  # how a recipe that holds this model (a student) rebuilds it
    model.checkpoint_meta = {"path": str(path), "global_step": checkpoint.get("global_step"), "ema": ema}
    return model.eval()


def load_teacher(path: str | Path | None) -> nn.Module:
    """``model.teacher``: the frozen teacher of a student recipe, the EMA weights of a framework checkpoint. (A null
    path is filled in by the training entry with a finished run of the experiment's ``teacher.experiment``.)"""
    if not path:
        raise CheckpointError("no teacher checkpoint: set model.teacher.path=<run>/checkpoints/last.ckpt, or leave it "
                              "null in a pd_*, cd_* or ect_* experiment to train or reuse one")  # fmt: skip
    return model_from_checkpoint(path, ema=True)


def load_first_stage(path: str | Path | None, scale_factor: float | None = None, scale_batches: int = 16) -> nn.Module:
    """``model.first_stage``: the stage-1 autoencoder of a finished ``ae_*`` run as a frozen
    :class:`~diffusion_lightning.models.LatentSpace` (without its discriminator and perceptual network, which only
    its training needs); ``scale_factor`` / ``scale_batches`` as there."""
    from .models import LatentSpace

    if not path:
        raise CheckpointError("no first-stage checkpoint: set model.first_stage.path=<ae run>/checkpoints/last.ckpt, "
                              "or leave it null in an ldm_* experiment to train or reuse one")  # fmt: skip
    checkpoint = load_checkpoint(path)
    config = (checkpoint.get("run_config") or {}).get("model")
    if not config or identity(checkpoint).get("recipe") != "Autoencoder":
        raise CheckpointError(f"{path} is {describe(checkpoint)}, not a stage-1 autoencoder: point "
                              "model.first_stage.path at checkpoints/last.ckpt of an ae_* run")  # fmt: skip
    net = instantiate(config["net"], _convert_="all")
    net.load_state_dict({k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")})
    first_stage = LatentSpace(net, scale_factor, scale_batches)
    first_stage.component_config = {"_target_": "diffusion_lightning.models.LatentSpace", "net": config["net"],
                                    "scale_batches": scale_batches}  # fmt: skip  (s: from the recipe's state dict)
    return first_stage


def build_component(config: dict[str, Any]) -> nn.Module:
    """A component a checkpoint stored the config of (``rebuild_kwargs``): built from ``config``, which it keeps
    (``component_config``) so that the recipe's next checkpoint stores it again."""
    config = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    module = instantiate(config, _convert_="all")
    module.component_config = config
    return module
