"""Sampling entry: ``python -m diffusion_lightning.sample ckpt=PATH sampler=ddim steps=50 num_samples=64``."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import track
from torchvision.utils import save_image

from .checkpoint import model_from_checkpoint
from .images import to_uint8
from .train import run_or_exit


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def generate(model: torch.nn.Module, num_samples: int, batch_size: int, seed: int, **sampler: object) -> torch.Tensor:
    """``num_samples`` images in [-1, 1] on the CPU, drawn in batches from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    chunks = []
    for start in track(range(0, num_samples, batch_size), description="sampling", transient=True):
        n = min(batch_size, num_samples - start)
        chunks.append(model.sample(n, generator=g, **sampler).float().cpu())
    return torch.cat(chunks)


def sample_from_config(cfg: DictConfig) -> Path:
    model = model_from_checkpoint(cfg.ckpt, ema=cfg.ema).to(resolve_device(cfg.device))
    images = generate(
        model, cfg.num_samples, cfg.batch_size, cfg.seed, name=cfg.sampler, steps=cfg.steps, **cfg.sampler_kwargs
    )
    out = Path(cfg.out) if cfg.out else Path(cfg.paths.output_dir) / "samples.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, out, nrow=max(1, int(len(images) ** 0.5)))
    if cfg.save_npz:
        np.savez(out.with_suffix(".npz"), samples=to_uint8(images).permute(0, 2, 3, 1).numpy())
    print(f"wrote {len(images)} samples ({cfg.sampler}, {cfg.steps} steps) to {out}")
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run_or_exit(sample_from_config, cfg)


if __name__ == "__main__":
    main()
