"""Training throughput of latent diffusion (ldm_fmnist) next to pixel-space DDPM with the same U-Net width
(ddpm_fmnist, made class-conditional as ldm_fmnist is), in one run: repeats alternated, medians reported.

    .venv/bin/python experiments/latent/ldm_vs_pixel.py [--first-stage AE_CKPT] [--repeats 5] [--steps 40] [--out FILE]

Both go through ``Trainer.fit`` with the EMA callback, gradient clipping and the run's precision, on random images
(throughput does not depend on the data or on the weights: without --first-stage a randomly initialised ae_fmnist
autoencoder is the first stage). The latent model's figure includes its frozen encoder's forward pass per batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from diffusion_lightning import cpu_precision
from diffusion_lightning.callbacks import EMA

CONF = Path(__file__).resolve().parents[2] / "conf"


def config(experiment: str, overrides: list[str]) -> Any:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"experiment={experiment}", *overrides])


def build(name: str, first_stage: str | None) -> tuple[Any, Any]:
    torch.manual_seed(0)
    if name == "pixel":
        cfg = config("ddpm_fmnist", ["model.net.num_classes=10", "model.class_dropout=0.1", "data.image_size=32"])
        return cfg, instantiate(cfg.model, _convert_="all")
    cfg = config("ldm_fmnist", [])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if first_stage is None:  # an untrained autoencoder of ae_fmnist's shape: the speed is what is measured
        ae_net = OmegaConf.to_container(config("ae_fmnist", []).model.net, resolve=True)
        model["first_stage"] = {"_target_": "diffusion_lightning.models.LatentSpace", "net": ae_net}
    else:
        model["first_stage"]["path"] = first_stage
    model["first_stage"]["scale_factor"] = 1.0
    return cfg, instantiate(model, _convert_="all")


class Timer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.end = time.perf_counter()


def throughput(cfg: Any, model: Any, batch: int, steps: int, warmup: int) -> float:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8 * batch, 1, 32, 32, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (8 * batch,), generator=g)
    order = [i % len(images) for i in range(batch * (steps + warmup))]
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch, sampler=order)
    timer = Timer(warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=cpu_precision(), max_steps=steps + warmup,
        gradient_clip_val=cfg.trainer.gradient_clip_val, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[EMA(decay=cfg.callbacks.ema.decay), timer],
    )
    trainer.fit(model, train_dataloaders=loader)
    return batch * steps / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-stage", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default="bench/ldm_vs_pixel.json")
    opts = parser.parse_args()
    models = {name: build(name, opts.first_stage) for name in ("pixel", "latent")}
    runs: dict[str, list[float]] = {name: [] for name in models}
    for r in range(opts.repeats):
        for name in (["pixel", "latent"] if r % 2 == 0 else ["latent", "pixel"]):
            cfg, model = models[name]
            runs[name].append(throughput(cfg, model, opts.batch, opts.steps, opts.warmup))
            print(f"{name}: {runs[name][-1]:.1f} img/s", flush=True)
    median = {name: statistics.median(v) for name, v in runs.items()}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "precision": cpu_precision(), "batch": opts.batch, "steps": opts.steps,
        "params": {n: sum(p.numel() for p in m.net.parameters()) for n, (_, m) in models.items()},
        "runs": {n: [round(v, 1) for v in vs] for n, vs in runs.items()},
        "images_per_s": {n: round(v, 1) for n, v in median.items()},
        "latent_over_pixel": round(median["latent"] / median["pixel"], 3),
    }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
