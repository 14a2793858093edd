"""Flow matching and reflow as recipes: the loss is the velocity error of the same draws, OT pairing changes which
noise meets which image but not the images or their conditions, and fm -> rf2 chains through the training entry
(the teacher's pairs generated once into the run folder, reused on resume), each checkpoint sampling on its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import QUIET, TINY_NET, folder_data
from omegaconf import open_dict

from diffusion_lightning.checkpoint import load_checkpoint, model_from_checkpoint
from diffusion_lightning.errors import UserError
from diffusion_lightning.models import DDPM, FlowMatching, Reflow
from diffusion_lightning.nets import UNet
from diffusion_lightning.train import train


def tiny_net(**kwargs: object) -> UNet:
    return UNet(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(), num_groups=4, dropout=0.0, **kwargs)  # fmt: skip


@pytest.mark.parametrize("prediction_type", ["v", "x0", "eps"])
def test_the_loss_is_the_velocity_error_of_the_same_draws(prediction_type):
    model = FlowMatching(tiny_net(), prediction_type=prediction_type, time_density="logit_normal", logit_mean=-0.6)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    torch.manual_seed(3)
    loss = model.loss(x0, None)
    torch.manual_seed(3)
    eps = torch.randn_like(x0)
    t = torch.sigmoid(-0.6 + torch.randn(6)).clamp(1e-5, 1 - 1e-5)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    with torch.no_grad():
        out = model(x_t, 1000 * t)
    v_hat = {"v": out, "x0": (x_t - out) / t[:, None, None, None],
             "eps": (out - x_t) / (1 - t[:, None, None, None])}[prediction_type]  # fmt: skip
    assert torch.allclose(loss.detach(), ((v_hat - (eps - x0)) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-6)


def test_ot_coupling_only_reorders_the_noise():
    model = FlowMatching(tiny_net(), coupling="ot")
    x0, eps = torch.rand(16, 1, 8, 8) * 2 - 1, torch.randn(16, 1, 8, 8)
    paired = model.pair_noise(x0, eps)
    assert sorted(map(tuple, paired.flatten(1).tolist())) == sorted(map(tuple, eps.flatten(1).tolist()))
    assert (x0 - paired).square().sum() <= (x0 - eps).square().sum()
    assert torch.equal(FlowMatching(tiny_net()).pair_noise(x0, eps), eps)  # independent coupling: as drawn


def test_bad_settings_are_refused():
    with pytest.raises(UserError, match="time_density"):
        FlowMatching(tiny_net(), time_density="beta")
    with pytest.raises(UserError, match="coupling"):
        FlowMatching(tiny_net(), coupling="sinkhorn")
    with pytest.raises(UserError, match="flow-matching"):
        Reflow(teacher=DDPM(tiny_net(), num_timesteps=40))
    with pytest.raises(UserError, match="needs its teacher"):
        Reflow()


def in_folder(cfg, folder: Path):
    with open_dict(cfg):
        cfg.paths.output_dir = str(folder)
    return cfg


def test_fm_then_reflow_through_the_entry(compose_train, image_folder, tmp_path):
    common = [*folder_data(image_folder), *TINY_NET, *QUIET, "trainer.val_check_interval=null",
              "trainer.limit_val_batches=1", "callbacks.sample_grid.num_samples=4", "callbacks.ema.decay=0.9",
              "logger=csv", "data.image_size=8"]  # fmt: skip
    cfg = in_folder(compose_train(["experiment=fm_fmnist", *common, "trainer.max_steps=3", "sampler.steps=4",
                                   "model.coupling=ot"]), tmp_path / "fm")  # fmt: skip
    assert cfg.model._target_.endswith("FlowMatching") and cfg.sampler.name == "euler"
    assert train(cfg)["trainer"].global_step == 3
    teacher_ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    teacher = model_from_checkpoint(teacher_ckpt)
    images, nfe = teacher.sample(2, generator=torch.Generator().manual_seed(0), return_nfe=True)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all() and nfe == 4
    assert teacher.sample(2, sampler={"name": "heun", "steps": 3}, return_nfe=True)[1] == 5

    # the student's network is the teacher's: no model.net keys
    reflow = ["experiment=rf2_fmnist", *(o for o in common if not o.startswith("model.net.")),
              f"model.teacher.path={teacher_ckpt}", "model.num_pairs=12",
              "model.pair_batch=5", "model.pair_sampler.steps=3", "sampler.steps=1"]  # fmt: skip
    run = tmp_path / "rf2"
    cfg2 = in_folder(compose_train([*reflow, "trainer.max_steps=2"]), run)
    assert train(cfg2)["trainer"].global_step == 2
    pairs = torch.load(run / "reflow_pairs.pt", weights_only=True)
    assert pairs["noise"].shape == pairs["sample"].shape == (12, 1, 8, 8) and "labels" not in pairs
    # the pairs are the teacher's ODE solutions from their noise (its Euler sampler at 3 steps, float16 on disk)
    x0 = teacher.sample(noise=pairs["noise"][:4].float(), sampler={"name": "euler", "steps": 3})
    torch.testing.assert_close(pairs["sample"][:4].float().clamp(-1, 1), x0, atol=2e-3, rtol=0)
    written = (run / "reflow_pairs.pt").stat().st_mtime_ns
    # resume: the pairs file is read, not written again
    cfg3 = in_folder(compose_train([*reflow, "trainer.max_steps=4", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]),
                     run)  # fmt: skip
    assert train(cfg3)["trainer"].global_step == 4
    assert (run / "reflow_pairs.pt").stat().st_mtime_ns == written
    student = model_from_checkpoint(run / "checkpoints" / "last.ckpt")  # rebuilds its teacher from the stored config
    assert isinstance(student, Reflow) and load_checkpoint(run / "checkpoints" / "last.ckpt")["identity"]["teacher"]
    images, nfe = student.sample(3, generator=torch.Generator().manual_seed(1), return_nfe=True)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all() and nfe == 1
