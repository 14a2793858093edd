"""Sampling entry: ``python -m diffusion_lightning.sample ckpt=PATH [sampler=ddim sampler.steps=50] num_samples=64``."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from .checkpoint import model_from_checkpoint
from .errors import run_entry
from .images import to_uint8
from .utils import generate, resolve_device, run_or_exit


def sample_from_config(cfg: DictConfig) -> Path:
    model = model_from_checkpoint(cfg.ckpt, ema=cfg.ema).to(resolve_device(cfg.device))
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") else None
    generator = torch.Generator().manual_seed(cfg.seed)
    nrow, labels = max(1, int(cfg.num_samples**0.5)), None
    if model.num_classes:  # one row per class
        nrow = max(1, cfg.num_samples // model.num_classes)
        labels = torch.arange(cfg.num_samples) // nrow % model.num_classes
    images, nfe = generate(
        model, cfg.num_samples, cfg.batch_size, generator, sampler, show_progress=True, guidance=cfg.get("guidance"),
        labels=labels, precision=cfg.precision,
    )
    out = Path(cfg.out) if cfg.out else Path(cfg.paths.output_dir) / "samples.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, out, nrow=nrow)
    if cfg.save_npz:
        np.savez(out.with_suffix(".npz"), samples=to_uint8(images).permute(0, 2, 3, 1).numpy())
    spec = model.sampler_spec(sampler)
    guidance = next((g for g in (cfg.get("guidance"), model.guidance) if g is not None), 1)
    rows = f", one row per class, guidance {guidance}" if model.num_classes else ""
    print(f"wrote {len(images)} samples ({spec['name']}, steps={spec.get('steps')}, {nfe} NFE{rows}) to {out}")
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run_or_exit(sample_from_config, cfg)


if __name__ == "__main__":
    run_entry(main, "sample")
