"""Progressive distillation as a training recipe: the teacher trained (or reused) first, rounds that halve the
student's steps with a checkpoint and a grid each, checkpoints that sample with their own step count without the
teacher's file, and a run resumed mid-round that continues the uninterrupted one exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import QUIET, TINY_NET, folder_data
from omegaconf import open_dict

from diffusion_lightning.checkpoint import load_checkpoint, load_teacher, model_from_checkpoint
from diffusion_lightning.diffusion import ContinuousVPDenoiser
from diffusion_lightning.errors import UserError
from diffusion_lightning.models.progressive_distillation import ProgressiveDistillation, linear_decay_per_round
from diffusion_lightning.train import train


def _teacher_overrides(folder: Path) -> list[str]:
    return [*TINY_NET, *folder_data(folder), *QUIET, "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "callbacks.sample_grid.num_samples=4", "sampler.steps=4",
            "logger=csv"]  # fmt: skip


def _pd_overrides(folder: Path, tmp_path: Path, *extra: str) -> list[str]:
    data = [o for o in folder_data(folder) if not o.startswith("model.")]  # the student is the teacher's network
    return ["experiment=pd_fmnist", *data, *QUIET, f"paths.log_dir={tmp_path / 'outputs'}",
            "model.start_steps=8", "model.end_steps=2", "model.steps_per_round=3", "trainer.limit_val_batches=1",
            "callbacks.sample_grid.num_samples=4", "logger=csv", *extra]  # fmt: skip


def _compose_pd(compose_train, image_folder, tmp_path, *extra: str):
    cfg = compose_train(_pd_overrides(image_folder, tmp_path, *extra))
    with open_dict(cfg):
        cfg.teacher.overrides = _teacher_overrides(image_folder)
    return cfg


def test_pd_trains_its_teacher_then_every_round_and_each_checkpoint_samples_with_its_own_steps(
    compose_train, image_folder, tmp_path, capsys, caplog
):
    # with an EMA of the student: the frozen teacher and the round buffers in the checkpoint follow the model
    ema = ["+callbacks.ema._target_=diffusion_lightning.callbacks.EMA", "+callbacks.ema.decay=0.5"]
    cfg = _compose_pd(compose_train, image_folder, tmp_path, *ema)
    assert cfg.trainer.max_steps == 6  # 2 rounds (8 -> 4 -> 2) of 3 steps
    out = train(cfg)
    assert "training it in" in capsys.readouterr().out
    (marker,) = (tmp_path / "outputs").glob("train/vdiff_fmnist/*/finished.json")
    assert (marker.parent / "train.log").is_file()  # the teacher run's own log
    teacher_ckpt = json.loads(marker.read_text())["checkpoint"]
    assert out["trainer"].global_step == 6

    run = Path(cfg.paths.output_dir)
    names = sorted(p.name for p in (run / "checkpoints").glob("step_*.ckpt"))
    assert names == ["step_00000003-4steps.ckpt", "step_00000006-2steps.ckpt"]
    assert sorted(p.name for p in (run / "grids").glob("*.png")) == ["final.png", "step_00000003.png"]
    round0, last = (load_checkpoint(run / "checkpoints" / n) for n in names)
    # the teacher's EMA weights stay frozen; round 1's teacher is round 0's final student
    teacher_state = load_checkpoint(teacher_ckpt)["state_dict"]
    for name, value in teacher_state.items():
        assert torch.equal(last["state_dict"][f"teacher.{name}"], value), name
    for key in ("state_dict", "current_model_state"):
        for name, value in round0["current_model_state"].items():
            if name.startswith("net."):
                assert torch.equal(last[key]["teacher_net." + name[4:]], value), (key, name)
        assert int(last[key]["student_steps"]) == 2 and out["model"].round_of(2) == 1

    # the teacher's run can go: a distilled checkpoint rebuilds it from its stored config
    shutil.rmtree(marker.parent)
    for name, steps in zip(names, (4, 2), strict=True):
        model = model_from_checkpoint(run / "checkpoints" / name)
        assert model.sampler_spec()["steps"] == steps
        images, nfe = model.sample(3, generator=torch.Generator().manual_seed(0), return_nfe=True)
        assert nfe == steps and images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()

    # the sampling entry with no sampler arguments: the checkpoint's own step count
    from diffusion_lightning.sample import sample_from_config

    capsys.readouterr()
    sample_cfg = compose_train([f"ckpt={run / 'checkpoints' / names[0]}", "num_samples=4",
                                f"out={tmp_path / 'grid.png'}"], config_name="sample")  # fmt: skip
    sample_from_config(sample_cfg)
    assert "(ddim, steps=4, 4 NFE)" in capsys.readouterr().out

    # its run gone, a rerun trains the teacher again; the next one reuses it, saying how long it trained; the first
    # round is logged as the others
    train(_compose_pd(compose_train, image_folder, tmp_path))
    assert "teacher: no finished vdiff_fmnist run" in capsys.readouterr().out
    with caplog.at_level("INFO", logger="diffusion_lightning"):
        train(_compose_pd(compose_train, image_folder, tmp_path))
    assert "a finished vdiff_fmnist run on this data, trained for 2 steps" in capsys.readouterr().out
    assert "round 1/2: 8 teacher steps -> 4 student steps" in caplog.text
    assert "round 2/2: 4 teacher steps -> 2 student steps" in caplog.text


def test_resume_mid_round_and_at_a_round_boundary_continues_exactly(compose_train, image_folder, tmp_path):
    teacher_run = _compose_pd(compose_train, image_folder, tmp_path)
    every_step = ["callbacks.model_checkpoint.every_n_train_steps=1", "data.random_flip=true"]
    full_cfg = _compose_pd(compose_train, image_folder, tmp_path, *every_step)
    train(full_cfg)
    del teacher_run
    run = Path(full_cfg.paths.output_dir)
    full = load_checkpoint(run / "checkpoints" / "last.ckpt")
    for step in (3, 4):  # the end of round 0; inside round 1
        (ckpt,) = (run / "checkpoints").glob(f"step_{step:08d}-*.ckpt")
        cfg = _compose_pd(compose_train, image_folder, tmp_path, *every_step, f"ckpt_path={ckpt}")
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / f"resumed{step}")
        train(cfg)
        resumed = load_checkpoint(tmp_path / f"resumed{step}" / "checkpoints" / "last.ckpt")
        assert resumed["global_step"] == full["global_step"] == 6
        for name, value in full["state_dict"].items():
            torch.testing.assert_close(resumed["state_dict"][name], value, rtol=0, atol=0, msg=name)
        opt_a, opt_b = full["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
        for i in opt_a:
            for k in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(opt_b[i][k], opt_a[i][k], rtol=0, atol=0)


def test_round_lr_and_the_optimiser_restart_every_round():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_decay_per_round(opt, 4)
    lrs = []
    for _ in range(9):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0, 0.75, 0.5, 0.25, 1.0, 0.75, 0.5, 0.25, 1.0]


def test_bad_settings_are_refused_with_the_fix(compose_train, image_folder, tmp_path):
    teacher_cfg = compose_train(["experiment=ddpm_fmnist", *_teacher_overrides(image_folder),
                                 "model.num_timesteps=100"])  # fmt: skip
    train(teacher_cfg)
    ckpt = str(Path(teacher_cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    with pytest.raises(UserError, match="start_steps <= 50"):
        ProgressiveDistillation(teacher=load_teacher(ckpt), start_steps=64, end_steps=1)
    with pytest.raises(UserError, match="power of two"):
        ProgressiveDistillation(teacher=load_teacher(ckpt), start_steps=12, end_steps=2)
    with pytest.raises(UserError, match="x0 or v"):
        ProgressiveDistillation(teacher=load_teacher(ckpt), start_steps=8, end_steps=2, prediction_type="eps")
    with pytest.raises(UserError, match="needs its teacher"):
        ProgressiveDistillation()
    # a discrete eps teacher: the student is fed the teacher's fractional timesteps and starts as its network
    pd = ProgressiveDistillation(teacher=load_teacher(ckpt), start_steps=8, end_steps=2)
    assert pd.time_input == "timestep" and pd.sampler_spec()["steps"] == 4
    sigma = pd.time.sigma(torch.tensor([0.5, 1.0], dtype=torch.float64)).float()
    assert pd.time.timestep(sigma).tolist() == pytest.approx([49.0, 99.0], abs=1e-3)
    # at the teacher's levels its network under the student's conditioning is the teacher
    as_student = ContinuousVPDenoiser(lambda z, c, y: pd.teacher(z, c), pd.time, "eps", "timestep")
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(as_student(x, sigma), pd.teacher.denoiser()(x, sigma), rtol=1e-5, atol=1e-5)


def test_pd_cifar_asks_for_its_teacher_and_never_trains_one(compose_train, tmp_path):
    from test_data import write_cifar

    write_cifar(tmp_path / "data")
    cfg = compose_train(["experiment=pd_cifar", f"paths.data_dir={tmp_path / 'data'}",
                         f"paths.log_dir={tmp_path / 'outputs'}"])  # fmt: skip
    assert cfg.model.start_steps == 8192 and cfg.model.end_steps == 1 and cfg.trainer.max_steps == 13 * 50000
    with pytest.raises(UserError, match=r"no finished vdiff_cifar run .* set model.teacher.path="):
        train(cfg)
    assert not (tmp_path / "outputs" / "train").exists()
    # a checkpoint at every round's end, named by its student's steps (8 ... 1), beside last.ckpt
    saving = cfg.callbacks.model_checkpoint
    assert saving.every_n_train_steps == 50000 and saving.save_top_k == -1
    assert "{student_steps:.0f}steps" in saving.filename
