"""Latent diffusion: the first-stage autoencoder's training step, the latent scale factor (one value on every DDP rank),
the two-stage `ldm_cifar` pipeline on a CIFAR-format fixture, and a stage-2 checkpoint that samples on its own."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import QUIET, TINY_NET
from omegaconf import open_dict
from test_data import write_cifar

from diffusion_lightning.checkpoint import load_checkpoint, model_from_checkpoint
from diffusion_lightning.data.errors import DatasetNotFoundError
from diffusion_lightning.models import Autoencoder
from diffusion_lightning.models.first_stage import latent_scale_factor
from diffusion_lightning.nets import AutoencoderKL, PatchDiscriminator
from diffusion_lightning.train import train


def test_scale_factor_is_one_over_the_std_of_all_latents_and_gives_unit_variance():
    g = torch.Generator().manual_seed(0)
    latents = [3.0 + 2.5 * torch.randn(8, 4, 4, 4, generator=g) for _ in range(5)]
    s = latent_scale_factor(latents)
    assert s == pytest.approx(1 / torch.cat(latents).double().std().item(), rel=1e-9)
    assert (torch.cat(latents) * s).std().item() == pytest.approx(1.0, abs=1e-6)


def _rank_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    latents = [(1 + 3 * rank) * torch.randn(6, 4, 2, 2, generator=g) + rank for _ in range(3)]  # unlike per rank

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    s = latent_scale_factor(latents, all_reduce)
    torch.save({"s": s, "latents": torch.cat(latents)}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_scale_factor_is_identical_on_two_ddp_ranks(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert r0["s"] == r1["s"]
    both = torch.cat([r0["latents"], r1["latents"]]).double()
    assert r0["s"] == pytest.approx(1 / both.std().item(), rel=1e-9)
    assert abs(1 / r0["latents"].double().std().item() - r0["s"]) > 0.05  # a per-rank factor would differ


def tiny_autoencoder(disc_start: int = 0) -> Autoencoder:
    torch.manual_seed(0)
    net = AutoencoderKL(image_size=16, in_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=2,
                        attention=False, num_groups=4)
    return Autoencoder(net, discriminator=PatchDiscriminator(3, ndf=8, n_layers=2), disc_start=disc_start,
                       perceptual_weight=0.0, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))


def test_autoencoder_steps_both_optimisers_and_counts_autoencoder_steps(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    model = tiny_autoencoder(disc_start=2)
    data = TensorDataset(torch.rand(24, 3, 16, 16) * 2 - 1, torch.zeros(24, dtype=torch.long))
    disc_before = [p.detach().clone() for p in model.discriminator.parameters()]
    ae_before = [p.detach().clone() for p in model.net.parameters()]
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, log_every_n_steps=1)
    trainer.fit(model, DataLoader(data, batch_size=4))
    assert trainer.global_step == 4  # autoencoder steps; the discriminator's (steps 2, 3) are not counted
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, model.discriminator.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(ae_before, model.net.parameters(), strict=True))
    logged = trainer.logged_metrics
    assert {"train/d_loss", "train/g_loss", "train/d_weight", "train/kl", "train/nll"} <= set(logged)
    assert 0 <= float(logged["train/d_weight"]) <= 0.5 * 1e4


def _stage1_overrides() -> list[str]:
    return [
        "model.net.ch=8", "model.net.ch_mult=[1,2]", "model.net.num_res_blocks=1", "model.net.num_groups=4",
        "model.net.attention=false", "model.discriminator.ndf=8", "model.disc_start=1", "model.fid_extractor=null",
        "trainer.max_steps=2", "data.batch_size=4", "data.num_workers=0", "trainer.limit_val_batches=1",
        "trainer.val_check_interval=null", "callbacks.reconstruction_grid.num_images=4", "logger=csv", *QUIET,
    ]  # fmt: skip


def _ldm_overrides(tmp_path: Path) -> list[str]:
    return [
        "experiment=ldm_cifar", f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'outputs'}",
        *TINY_NET, *QUIET, "trainer.max_steps=2", "data.batch_size=4", "data.num_workers=0",
        "trainer.limit_val_batches=1", "trainer.val_check_interval=null", "callbacks.sample_grid.num_samples=10",
        "sampler.steps=2", "model.num_timesteps=50", "model.first_stage.scale_batches=2",
        "model.lr_scheduler.warmup_steps=2", "logger=csv",
    ]  # fmt: skip


def test_ldm_cifar_trains_stage_one_then_two_reuses_stage_one_and_samples_without_data(
    compose_train, tmp_path, capsys
):
    write_cifar(tmp_path / "data")
    cfg = compose_train(_ldm_overrides(tmp_path))
    with open_dict(cfg):
        cfg.first_stage.overrides = _stage1_overrides()
    assert cfg.model.class_dropout == 0.1 and cfg.model.net.num_classes == 10
    out = train(cfg)

    markers = list((tmp_path / "outputs").glob("train/ae_cifar/*/finished.json"))
    assert len(markers) == 1, "stage 1 ran in its own run folder"
    stage1 = json.loads(markers[0].read_text())
    stage1_run = markers[0].parent
    assert stage1["global_step"] == 2 and (stage1_run / "grids" / "final.png").is_file()
    assert (stage1_run / ".hydra" / "config.yaml").is_file()
    assert {"test/psnr", "test/ssim"} <= set(stage1["test"])
    model = out["model"]
    assert out["trainer"].global_step == 2
    scale = float(model.first_stage.scale_factor)
    assert math.isfinite(scale) and scale > 0
    assert not model.first_stage.training and not any(p.requires_grad for p in model.first_stage.parameters())
    ae_state = load_checkpoint(stage1["checkpoint"])["state_dict"]
    for name, value in model.first_stage.net.state_dict().items():
        assert torch.equal(value, ae_state[f"net.{name}"]), f"the frozen first stage changed: {name}"
    run = Path(cfg.paths.output_dir)
    assert (run / "finished.json").is_file() and (run / "grids" / "final.png").is_file()
    assert "training it in" in capsys.readouterr().out

    # a rerun reuses the finished stage 1
    cfg = compose_train(_ldm_overrides(tmp_path))
    train(cfg)
    assert len(list((tmp_path / "outputs").glob("train/ae_cifar/*/finished.json"))) == 1
    assert f"reusing {stage1['checkpoint']}" in capsys.readouterr().out

    # the stage-2 checkpoint samples with neither the data set nor the stage-1 checkpoint present
    shutil.rmtree(tmp_path / "data")
    shutil.rmtree(stage1_run)
    ldm = model_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert float(ldm.first_stage.scale_factor) == float(load_checkpoint(run / "checkpoints" / "last.ckpt")[
        "state_dict"]["first_stage.scale_factor"]) == scale
    assert ldm.image_shape == (3, 32, 32) and ldm.sample_shape == (4, 16, 16)
    g = torch.Generator().manual_seed(0)
    images = ldm.sample(3, y=torch.tensor([0, 5, 9]), generator=g, guidance=3.0)
    assert images.shape == (3, 3, 32, 32) and torch.isfinite(images).all() and images.abs().max() <= 1

    # the sampling entry: guidance on the command line, one row per class
    from PIL import Image

    from diffusion_lightning.sample import sample_from_config

    grid = tmp_path / "grid.png"
    sample_cfg = compose_train([f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "guidance=3", "num_samples=20",
                                "sampler.steps=2", "sampler=ddim", f"out={grid}"], config_name="sample")
    sample_from_config(sample_cfg)
    assert Image.open(grid).size == (2 + 2 * 34, 2 + 10 * 34)  # 10 rows (classes) of 2, 2-pixel padding
    assert "one row per class, guidance 3" in capsys.readouterr().out


def test_ldm_cifar_without_data_stops_before_anything_starts(compose_train, tmp_path):
    cfg = compose_train(["experiment=ldm_cifar", f"paths.data_dir={tmp_path / 'nodata'}",
                         f"paths.log_dir={tmp_path / 'outputs'}", *QUIET])
    with pytest.raises(DatasetNotFoundError) as err:
        train(cfg)
    message = str(err.value)
    assert str(tmp_path / "nodata") in message and "cifar-10" in message.lower()
    assert not (tmp_path / "outputs").exists(), "no stage-1 run folder before the data is found"


def test_a_foreign_first_stage_checkpoint_is_refused(tmp_path):
    from diffusion_lightning.checkpoint import load_first_stage
    from diffusion_lightning.errors import CheckpointError

    torch.save({"state_dict": {}, "run_config": {"model": {"_target_": "diffusion_lightning.models.DDPM"}}},
               tmp_path / "ddpm.ckpt")
    with pytest.raises(CheckpointError, match="not a stage-1 autoencoder"):
        load_first_stage(tmp_path / "ddpm.ckpt")


def test_sampling_an_autoencoder_checkpoint_is_refused_with_the_fix(tmp_path):
    from diffusion_lightning.errors import CheckpointError

    config = {"model": {"_target_": "diffusion_lightning.models.Autoencoder"}}
    torch.save({"state_dict": {}, "run_config": config}, tmp_path / "ae.ckpt")
    with pytest.raises(CheckpointError, match="stage-1 autoencoder.*ldm_"):
        model_from_checkpoint(tmp_path / "ae.ckpt")


def test_latent_sampling_never_clips_latents_to_the_image_range():
    """The latent first stage declares x0 unbounded: clip_denoised and threshold, which bound x0_hat to the image
    range [-1, 1], leave latents alone (the reference samples latents unclipped)."""
    from diffusion_lightning.diffusion import sample
    from diffusion_lightning.models import DDPM, LatentSpace
    from diffusion_lightning.nets import UNet

    torch.manual_seed(0)
    ae = AutoencoderKL(image_size=16, in_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=2,
                       attention=False, num_groups=4)  # fmt: skip
    net = UNet(image_size=8, in_channels=2, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), num_groups=4)
    for p in net.parameters():
        p.data.add_(0.3 * torch.randn_like(p))  # x0_hat far outside [-1, 1]
    ldm = DDPM(net, first_stage=LatentSpace(ae, scale_factor=1.0), num_timesteps=40).eval()
    denoiser = ldm.guided_denoiser(None)
    assert not denoiser.bounded and ldm.denoiser().bounded
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    clipped = sample(denoiser, noise, "ddim", steps=3, clip_denoised=True, threshold=0.99).x
    free = sample(denoiser, noise, "ddim", steps=3, clip_denoised=False).x
    assert torch.equal(clipped, free) and free.abs().max() > 1
    bounded = sample(ldm.denoiser(), noise, "ddim", steps=3, clip_denoised=True).x
    assert not torch.equal(bounded, free)  # the same network read as pixels is clipped


def test_stage_one_inherits_data_paths_devices_and_a_ddp_strategy_that_allows_an_idle_discriminator(
    compose_train, tmp_path
):
    from diffusion_lightning.prior_stages import prior_run_config

    cfg = compose_train(["experiment=ldm_cifar", "trainer=ddp", "trainer.devices=2", "seed=7",
                         f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'outputs'}"])
    with open_dict(cfg):
        cfg.first_stage.overrides = ["model.disc_start=10"]
    stage1 = prior_run_config(cfg)
    assert stage1.model._target_.endswith(".Autoencoder") and stage1.model.disc_start == 10
    assert stage1.data.root == str(tmp_path / "data") and stage1.seed == 7 and stage1.trainer.devices == 2
    assert stage1.trainer.strategy == "ddp_find_unused_parameters_true"
    assert Path(stage1.paths.output_dir).parent == tmp_path / "outputs" / "train" / "ae_cifar"
    single = compose_train(["experiment=ldm_cifar", f"paths.log_dir={tmp_path / 'outputs'}"])
    assert "strategy" not in prior_run_config(single).trainer
