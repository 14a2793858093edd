"""Export a trained pixel DDPM checkpoint to diffusers' pipeline format:
``python -m diffusion_lightning.export ckpt=PATH out=DIR [ema=false]``.

DIR gets the layout of ``diffusers.DDPMPipeline.save_pretrained``: ``unet/`` a ``UNet2DModel`` with the checkpoint's
EMA (``ema=false``: raw) weights mapped tensor for tensor onto diffusers' names (the layout of
:func:`~diffusion_lightning.interop.diffusers.diffusers_unet`), ``scheduler/`` a ``DDPMScheduler`` with the same betas
(``trained_betas``), prediction type and fixed variance, and x0 clipping as the model's own sampler. Usage::

    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline
    pipe = DDPMPipeline.from_pretrained("DIR")
    images = pipe(num_inference_steps=100).images  # at most model.num_timesteps (the pipeline's default is 1000)
    ddim = DDIMPipeline(pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading"))
    images = ddim(num_inference_steps=50, use_clipped_model_output=True).images  # as our sampler=ddim steps=ddim50

Which samplers agree with ours (tests/integration/test_export.py): ``DDPMScheduler`` (``timestep_spacing="linspace"``,
as exported) with N steps runs our ``sampler=ddpm sampler.steps=N``: the timesteps of our respacing and, for an
unconditional model, the same images from the same CPU generator (both draw the start noise, then one noise per step).
diffusers' ``DDIMScheduler`` always steps from t to t - T // N, so it agrees with our DDIM with
``timestep_spacing="leading"`` and ``steps="ddimN"`` where N divides T (then both visit 0, T/N, 2T/N, ...; with
"linspace" only for N = T); use ``use_clipped_model_output=True``: our DDIM recomputes eps from the clipped x0. A
class-conditional model's ``UNet2DModel`` takes ``class_labels`` (label ``num_classes`` is the guidance null class), but
diffusers' DDPM/DDIM pipelines pass none: run the scheduler loop yourself.

Refused with the option to change: a learned-variance model (``model.variance_type=learned_range``, 2C outputs),
models other than a pixel :class:`~diffusion_lightning.models.DDPM` / ``ImprovedDDPM`` (latent diffusion,
continuous-time, distilled and consistency models), and U-Net options diffusers' ``UNet2DModel`` cannot express
(``channel_mult[0] != 1``; ``num_heads > 1`` over attention blocks of different widths: use ``num_head_channels``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from torch import nn

from .checkpoint import model_from_checkpoint
from .errors import UserError, run_entry
from .interop.diffusers import PREDICTION_TYPES, diffusers_scheduler, to_diffusers_unet
from .utils import run_or_exit


def check_exportable(model: nn.Module) -> None:
    """Raise a :class:`UserError` naming the reason if ``model`` cannot become a diffusers DDPM pipeline."""
    from .models import DDPM, PixelSpace
    from .nets import UNet

    name = type(model).__name__
    if not isinstance(model, DDPM) or type(model.first_stage) is not PixelSpace:
        raise UserError(
            f"cannot export a {name} checkpoint: only pixel DDPM checkpoints export (models.DDPM or "
            "models.ImprovedDDPM: a U-Net on images over a discrete beta schedule, as diffusers' DDPMPipeline runs). "
            "Latent diffusion, continuous-time, progressive-distillation and consistency models have no "
            "diffusers DDPM equivalent"
        )
    if model.learned_variance:
        raise UserError(
            f"cannot export this {name}: it learns its variance (model.variance_type={model.variance_type}, "
            f"model.net.out_channels={model.net.out_channels} = 2C). The export targets fixed-variance models, whose "
            "C-channel output every diffusers scheduler (DDIM, DPM-Solver, ...) reads: train with "
            "model.variance_type=fixed_small or fixed_large and model.net.out_channels=C"
        )
    if model.variance_type not in ("fixed_small", "fixed_large"):
        raise UserError(f"cannot export model.variance_type={model.variance_type}: use fixed_small or fixed_large")
    if model.prediction_type not in PREDICTION_TYPES:
        raise UserError(f"cannot export model.prediction_type={model.prediction_type}: use one of eps, x0, v")
    if not isinstance(model.net, UNet):
        raise UserError(f"cannot export a {type(model.net).__name__} network: only diffusion_lightning.nets.UNet maps "
                        "onto diffusers' UNet2DModel")


def net_config_of(model: nn.Module) -> dict[str, Any]:
    """The U-Net keyword arguments a model was built with, from its run config (``model.net``)."""
    run_config = getattr(model, "run_config", None) or {}
    net = (run_config.get("model") or {}).get("net")
    if not net:
        raise UserError("the model has no run config with model.net (it was not loaded from a training checkpoint): "
                        "pass net_config, the U-Net's keyword arguments")
    return dict(net)


def export_model(model: nn.Module, out: str | Path, net_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (a pixel DDPM; :func:`check_exportable`) to ``out`` as a diffusers ``DDPMPipeline``.
    ``net_config``: the U-Net's keyword arguments (default: the model's run config)."""
    from diffusers import DDPMPipeline

    check_exportable(model)
    unet = to_diffusers_unet(model.net, net_config if net_config is not None else net_config_of(model))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=diffusers_scheduler(model)).save_pretrained(out)
    return out


def export_from_config(cfg: DictConfig) -> Path:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise UserError("the export needs diffusers: pip install diffusers (or make install, with the dev "
                        "extras)") from None
    model = model_from_checkpoint(cfg.ckpt, ema=cfg.ema)
    out = export_model(model, cfg.out)
    params = sum(p.numel() for p in model.net.parameters())
    print(f"wrote diffusers DDPMPipeline to {out} (UNet2DModel, {params:,d} parameters, {'EMA' if cfg.ema else 'raw'} "
          f"weights; DDPMScheduler T={model.diffusion.num_timesteps}, prediction_type="
          f"{PREDICTION_TYPES[model.prediction_type]}, variance_type={model.variance_type})")
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_or_exit(export_from_config, cfg)


if __name__ == "__main__":
    run_entry(main, "export")
