"""The consistency recipes as LightningModules: CD and ECT start as their teacher's denoiser (with the boundary
condition), train from a teacher checkpoint (reused or trained first), write checkpoints that sample in 1 and 2 steps
without the teacher's file; iCT and CT train from scratch with their curricula; bad settings are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import QUIET, TINY_NET, folder_data
from omegaconf import open_dict

from diffusion_lightning.checkpoint import load_checkpoint, load_teacher, model_from_checkpoint
from diffusion_lightning.errors import UserError
from diffusion_lightning.models import ConsistencyDistillation, ConsistencyTraining, ConsistencyTuning
from diffusion_lightning.train import train


def _teacher_overrides(folder: Path) -> list[str]:
    return [*TINY_NET, *folder_data(folder), *QUIET, "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "callbacks.sample_grid.num_samples=4", "sampler.steps=4",
            "logger=csv"]  # fmt: skip


def _compose(compose_train, experiment: str, folder: Path, tmp_path: Path, *extra: str):
    data = [o for o in folder_data(folder) if not o.startswith("model.")]
    net = TINY_NET if experiment.startswith(("ict", "ct")) else []
    cfg = compose_train([f"experiment={experiment}", *data, *net, *QUIET, f"paths.log_dir={tmp_path / 'outputs'}",
                         "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                         "callbacks.sample_grid.num_samples=4", "callbacks.model_checkpoint.every_n_train_steps=2",
                         "logger=csv", *extra])  # fmt: skip
    if cfg.get("teacher"):
        with open_dict(cfg):
            cfg.teacher.overrides = _teacher_overrides(folder)
    return cfg


@pytest.mark.parametrize("experiment", ["cd_fmnist", "ect_fmnist"])
def test_cd_and_ect_train_from_their_teacher_and_sample_in_one_and_two_steps_without_it(
    experiment, compose_train, image_folder, tmp_path, capsys
):
    cfg = _compose(compose_train, experiment, image_folder, tmp_path)
    out = train(cfg)
    assert "training it in" in capsys.readouterr().out  # no vdiff_fmnist run yet: the teacher is trained first
    (marker,) = (tmp_path / "outputs").glob("train/vdiff_fmnist/*/finished.json")
    teacher_ckpt = json.loads(marker.read_text())["checkpoint"]
    assert out["trainer"].global_step == 4
    last = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    for name, value in load_checkpoint(teacher_ckpt)["state_dict"].items():  # the teacher stays frozen
        assert torch.equal(last["state_dict"][f"teacher.{name}"], value), name

    shutil.rmtree(marker.parent)  # the checkpoint rebuilds its teacher from the stored config
    model = model_from_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    for steps in (1, 2):
        images, nfe = model.sample(3, generator=torch.Generator().manual_seed(0), return_nfe=True, steps=steps)
        assert nfe == steps and images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model.denoiser()(x, 0.002), x)  # the boundary condition


def test_the_student_starts_as_its_teacher_with_the_boundary_condition(compose_train, image_folder, tmp_path):
    teacher_cfg = compose_train(["experiment=vdiff_fmnist", *_teacher_overrides(image_folder)])
    train(teacher_cfg)
    ckpt = str(Path(teacher_cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    for cls in (ConsistencyDistillation, ConsistencyTuning):
        student = cls(teacher=load_teacher(ckpt)).eval()
        teacher = student.teacher.denoiser()
        x = torch.randn(4, 1, 8, 8) * 3
        for sigma in (0.01, 0.5, 3.0, 80.0):
            expected = x + (sigma - 0.002) / sigma * (teacher(x, sigma) - x)
            torch.testing.assert_close(student.denoiser()(x, sigma), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="needs its teacher"):
        ConsistencyTuning()
    with pytest.raises(UserError, match=r"local LPIPS weights .* model.lpips="):
        ConsistencyDistillation(teacher=load_teacher(ckpt), distance="lpips")
    with pytest.raises(UserError, match="solver is heun or euler"):
        ConsistencyDistillation(teacher=load_teacher(ckpt), solver="rk4")


CT = ["model.curriculum=ct", "model.s0=2", "model.s1=150", "model.mu0=0.9", "model.level_sampling=uniform",
      "model.weighting=uniform", "model.distance=l2"]  # fmt: skip


@pytest.mark.parametrize("model", ["ict", "ct"])
def test_consistency_training_from_scratch_follows_its_curriculum(model, compose_train, image_folder, tmp_path):
    cfg = _compose(compose_train, "ict_fmnist", image_folder, tmp_path, *(CT if model == "ct" else []),
                   "trainer.max_steps=8", "trainer.val_check_interval=4",
                   "callbacks.model_checkpoint.every_n_train_steps=4")  # fmt: skip
    out = train(cfg)
    m: ConsistencyTraining = out["model"]
    assert out["trainer"].global_step == 8 and m.curriculum == model
    if model == "ict":  # s0 = 10 doubling every floor(8 / 8) = 1 step up to s1 = 1280
        assert [m.num_levels(k) for k in (0, 1, 2, 7)] == [11, 21, 41, 1281] and m.target_net is None
    else:  # CT: the target network is an EMA of the weights, not the weights
        assert [m.num_levels(k) for k in (0, 8)] == [2, 151] and m.target_decay(0) == pytest.approx(0.9)
        assert any(not torch.equal(a, b) for a, b in zip(m.target_net.parameters(), m.net.parameters(), strict=True))
    model_ = model_from_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    images, nfe = model_.sample(2, generator=torch.Generator().manual_seed(0), return_nfe=True, steps=2)
    assert nfe == 2 and torch.isfinite(images).all()


def test_ect_and_cd_cifar_ask_for_their_teacher_and_never_train_one(compose_train, tmp_path):
    from test_data import write_cifar

    write_cifar(tmp_path / "data")
    for experiment in ("ect_cifar", "cd_cifar"):
        cfg = compose_train([f"experiment={experiment}", f"paths.data_dir={tmp_path / 'data'}",
                             f"paths.log_dir={tmp_path / 'outputs'}"])  # fmt: skip
        with pytest.raises(UserError, match=r"no finished vdiff_cifar run .* set model.teacher.path="):
            train(cfg)
    assert not (tmp_path / "outputs" / "train").exists()
