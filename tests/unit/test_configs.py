"""Every config composes and instantiates: each experiment's model and data module, each sampler through a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONF, TINY_NET
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lightning.data.base import ImageDataModule
from diffusion_lightning.models import Autoencoder, DiffusionModel

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SAMPLERS = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))


def test_the_groups_are_not_empty():
    assert {"ddpm_fmnist", "ddpm_cifar", "iddpm_fmnist", "iddpm_cifar", "ae_fmnist", "ldm_fmnist", "ae_cifar",
            "ldm_cifar", "vdiff_fmnist", "vdiff_cifar", "pd_fmnist", "pd_cifar", "ct_cifar", "ict_cifar", "cd_cifar",
            "ect_cifar", "ict_fmnist", "cd_fmnist", "ect_fmnist", "edm_fmnist", "edm_cifar",
            "lict_fmnist"} <= set(EXPERIMENTS)
    assert {"ddpm", "ddim", "dpmpp", "heun", "consistency"} <= set(SAMPLERS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, compose_train, tmp_path):
    """The model (the paper-sized networks too), its optimiser and LR schedule, its sampler, and the data module
    (constructed only: no data is read)."""
    cfg = compose_train([f"experiment={experiment}", f"paths.data_dir={tmp_path}"])
    config = OmegaConf.to_container(cfg.model, resolve=True)
    if cfg.get("first_stage"):  # latent diffusion: a first stage built from its stage-1 experiment's config
        stage1 = compose_train([f"experiment={cfg.first_stage.experiment}", f"paths.data_dir={tmp_path}"])
        assert stage1.data._target_ == cfg.data._target_  # stage 1 on the same data set
        assert config["first_stage"]["_target_"].endswith("load_first_stage") and config["first_stage"]["path"] is None
        config["first_stage"] = {"_target_": "diffusion_lightning.models.LatentSpace",
                                 "net": OmegaConf.to_container(stage1.model.net, resolve=True)}  # fmt: skip
    if cfg.get("teacher"):  # distillation: a teacher built from its experiment's config
        teacher = compose_train([f"experiment={cfg.teacher.experiment}", f"paths.data_dir={tmp_path}"])
        assert teacher.data._target_ == cfg.data._target_
        assert config["teacher"]["_target_"].endswith("load_teacher") and config["teacher"]["path"] is None
        config["teacher"] = OmegaConf.to_container(teacher.model, resolve=True)
    model = instantiate(config, _convert_="all")
    if isinstance(model, Autoencoder):
        ae_optimizer, disc_optimizer = model.configure_optimizers()
        assert ae_optimizer.defaults["lr"] == cfg.model.optimizer.lr and disc_optimizer is not None
        assert cfg.trainer.gradient_clip_val is None  # Lightning refuses clipping under manual optimisation
    else:
        assert isinstance(model, DiffusionModel)
        assert model.sampler == {**cfg.sampler} and model.sampler["name"] == cfg.sampler.name
        if cfg.model._target_.endswith("ProgressiveDistillation"):
            assert cfg.trainer.max_steps == model.num_rounds * cfg.model.steps_per_round
            assert model.sampler_spec()["steps"] == cfg.model.start_steps // 2
        optimizers = model.configure_optimizers()
        assert isinstance(optimizers["optimizer"], torch.optim.Optimizer)
        assert optimizers["optimizer"].defaults["lr"] == cfg.model.optimizer.lr
    image_channels = (model.first_stage.image_shape[0] if cfg.get("first_stage") else model.teacher.image_shape[0]
                      if cfg.get("teacher") else cfg.model.net.in_channels)  # fmt: skip
    assert model.image_shape == (image_channels, cfg.data.image_size, cfg.data.image_size)
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, ImageDataModule) and datamodule.image_size == cfg.data.image_size
    assert Path(datamodule.root) == tmp_path
    for name in ("callbacks", "logger"):
        for entry in (cfg.get(name) or {}).values():
            if entry is not None:
                instantiate(entry)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_config_runs_through_a_model(sampler, compose_train, image_folder):
    """``sampler=<name>`` gives the model's sampling pipeline a complete, valid setting."""
    from conftest import folder_data

    cfg = compose_train(folder_data(image_folder) + TINY_NET + [f"sampler={sampler}", "sampler.steps=3"])
    model = instantiate(cfg.model, _convert_="all")
    images, nfe = model.sample(2, generator=torch.Generator().manual_seed(0), return_nfe=True)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    assert nfe == (5 if sampler == "heun" else 3)


def test_sample_and_evaluate_default_to_the_checkpoints_own_sampler(compose_train):
    sample_cfg = compose_train(["ckpt=x.ckpt"], "sample")
    assert sample_cfg.get("sampler") is None  # the model's own
    chosen = compose_train(["ckpt=x.ckpt", "sampler=dpmpp", "sampler.steps=12"], "evaluate")
    assert (chosen.sampler.name, chosen.sampler.steps, chosen.sampler.lower_order_final) == ("dpmpp", 12, True)
