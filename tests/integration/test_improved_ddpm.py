"""Improved DDPM through the configs: learned variance, hybrid / vlb losses, sampler state in checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import QUIET, TINY_NET, folder_data
from hydra.errors import InstantiationException

from diffusion_lightning.checkpoint import load_checkpoint, model_from_checkpoint
from diffusion_lightning.diffusion.importance import LossSecondMomentResampler
from diffusion_lightning.train import train

FIT = [
    "trainer.val_check_interval=null", "trainer.limit_val_batches=1", "callbacks.sample_grid.num_samples=4",
    "sampler.steps=3", "logger=csv",
    "model.num_timesteps=20", "model.net.out_channels=2",
]


def test_iddpm_fmnist_experiment_trains(compose_train):
    cfg = compose_train(
        ["experiment=iddpm_fmnist", "trainer.max_steps=3", "data.batch_size=8", "data.num_workers=0",
         "trainer.val_check_interval=null", "trainer.limit_val_batches=1", "callbacks.sample_grid.num_samples=4",
         "sampler.steps=2", *QUIET]
    )
    out = train(cfg)
    model = out["model"]
    assert model.diffusion.num_timesteps == 1000 and model.variance_type == "learned_range"
    assert model.net.out_channels == 2 and out["trainer"].global_step == 3
    metrics = out["trainer"].callback_metrics
    assert {"train/mse", "train/vlb"} <= set(metrics)


def test_iddpm_cifar_experiment_is_the_paper_setup(compose_train, tmp_path):
    cfg = compose_train(["experiment=iddpm_cifar", f"paths.data_dir={tmp_path}"])
    m = cfg.model
    assert (m.num_timesteps, m.beta_schedule, m.loss_type, m.optimizer.lr) == (4000, "cosine", "hybrid", 1e-4)
    assert m.lr_scheduler.warmup_steps == 0 and cfg.sampler.name == "ddpm" and m.sampler.steps == 100
    assert (m.net.model_channels, m.net.num_res_blocks, m.net.dropout, m.net.out_channels) == (128, 3, 0.3, 6)
    assert cfg.data.batch_size == 128
    assert cfg.trainer.gradient_clip_val is None  # the reference code does not clip (DDPM's clips at 1)


def test_learned_variance_needs_2c_outputs(compose_train, image_folder):
    cfg = compose_train(folder_data(image_folder) + TINY_NET + QUIET + ["model=iddpm", "model.net.out_channels=1"])
    with pytest.raises(InstantiationException, match="out_channels=2"):
        train(cfg)


def test_vlb_loss_importance_sampler_is_checkpointed_and_resumes(compose_train, image_folder, tmp_path):
    overrides = folder_data(image_folder) + TINY_NET + QUIET + FIT + [
        "model=iddpm", "model.loss_type=vlb", "trainer.max_steps=12",
        "callbacks.model_checkpoint.every_n_train_steps=6",
    ]
    out = train(compose_train(overrides))
    sampler = out["model"].timestep_sampler
    assert isinstance(sampler, LossSecondMomentResampler)
    ckpt = load_checkpoint(Path(tmp_path) / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["timestep_sampler"]["counts"].sum() > 0
    # a resumed model holds the same sampler history
    model = model_from_checkpoint(Path(tmp_path) / "run" / "checkpoints" / "last.ckpt")
    model.on_load_checkpoint(ckpt)
    torch.testing.assert_close(model.timestep_sampler.probabilities(), sampler.probabilities())
    # and samples with its learned variance through the respaced process
    x = model.sample(3, sampler={"name": "ddpm", "steps": 5}, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
