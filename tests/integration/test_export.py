"""Export to diffusers' DDPMPipeline layout: diffusers' UNet2DModel computes what our U-Net does (weights perturbed
first, so that zero-initialised output convs hide no mapping error), and diffusers' DDPM and DDIM schedulers sample
what our samplers sample from the same noise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from conftest import QUIET, TINY_NET, folder_data  # noqa: E402
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, UNet2DModel  # noqa: E402

from diffusion_lightning.checkpoint import model_from_checkpoint  # noqa: E402
from diffusion_lightning.diffusion.schedules import space_timesteps  # noqa: E402
from diffusion_lightning.errors import UserError  # noqa: E402
from diffusion_lightning.export import export_model  # noqa: E402
from diffusion_lightning.interop.diffusers import to_diffusers_unet  # noqa: E402
from diffusion_lightning.models import DDPM, ContinuousDiffusion  # noqa: E402
from diffusion_lightning.nets import UNet  # noqa: E402
from diffusion_lightning.train import train  # noqa: E402

T = 50
# 8x8, widths 8 and 16, attention at 4x4 with 4 channels per head (4 heads, as in the middle block)
SMALL: dict[str, Any] = dict(image_size=8, in_channels=1, model_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                             attention_resolutions=[4], num_head_channels=4, dropout=0.0, num_groups=4)


def perturb(net: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Add noise to every parameter (our output convs start at zero and would hide a wrong mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def outputs(net: nn.Module, unet: UNet2DModel, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ours and diffusers' outputs on the same random inputs at integer timesteps across the range."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, net.in_channels, net.image_size, net.image_size, generator=g)
    t = torch.tensor([0, 7, 23, T - 1])
    with torch.no_grad():
        return net.eval()(x, t, y), unet.eval()(x, t, class_labels=y).sample


def assert_same_outputs(net: nn.Module, unet: UNet2DModel, y: torch.Tensor | None = None) -> None:
    ours, theirs = outputs(net, unet, y)
    assert ours.abs().mean() > 0.1  # not a trivially zero output
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def assert_same_images(theirs: np.ndarray, ours: torch.Tensor) -> None:
    """diffusers' NHWC images in [0, 1] against ours, NCHW in [-1, 1]; not trivially equal: not all clipped."""
    ours_np = ((ours + 1) / 2).permute(0, 2, 3, 1).numpy()
    inside = np.mean((ours_np > 1e-3) & (ours_np < 1 - 1e-3))
    assert inside > 0.05, f"only {inside:.1%} of the pixels are not clipped"
    np.testing.assert_allclose(theirs, ours_np, atol=1e-4, rtol=0)


def assert_same_ddim(model: DDPM, pipe: DDPMPipeline, spacing: str, steps: int, ours: int | str) -> None:
    """diffusers' DDIMPipeline (scheduler from the exported config) against our DDIM, from the same noise."""
    ddim = DDIMPipeline(pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing))
    ddim.set_progress_bar_config(disable=True)
    ddim.scheduler.set_timesteps(steps)
    assert ddim.scheduler.timesteps.tolist() == space_timesteps(T, ours)[::-1]
    theirs = ddim(batch_size=4, generator=torch.Generator().manual_seed(3), num_inference_steps=steps, eta=0.0,
                  use_clipped_model_output=True, output_type="np").images
    noise = torch.randn(4, *model.image_shape, generator=torch.Generator().manual_seed(3))  # as diffusers draws it
    images = model.sample(noise=noise, sampler={"name": "ddim", "steps": ours, "eta": 0.0})
    assert_same_images(theirs, images)


def assert_same_ddpm(model: DDPM, pipe: DDPMPipeline, steps: int) -> None:
    """diffusers' DDPMPipeline against our ancestral sampler, from one CPU generator: both draw the start noise,
    then one noise tensor per step but the last, in the same order."""
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(steps)
    assert pipe.scheduler.timesteps.tolist() == space_timesteps(T, steps)[::-1]
    theirs = pipe(batch_size=4, generator=torch.Generator().manual_seed(4), num_inference_steps=steps,
                  output_type="np").images
    images = model.sample(4, generator=torch.Generator().manual_seed(4), sampler={"name": "ddpm", "steps": steps})
    assert_same_images(theirs, images)


def train_tiny(compose_train, image_folder: Path, tmp_path: Path, extra: list[str]) -> Path:
    """2 steps of a tiny model on 8x8 images, T=50; its last.ckpt."""
    tiny = [o for o in TINY_NET if not o.startswith("model.net.attention_resolutions")]
    train(compose_train(folder_data(image_folder) + tiny + QUIET + [
        "trainer.max_steps=2", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
        "callbacks.sample_grid=null", "sampler.steps=2", "callbacks.ema.decay=0.9", f"model.num_timesteps={T}",
        "model.lr_scheduler.warmup_steps=2", "logger=csv", *extra,
    ]))  # fmt: skip
    return tmp_path / "run" / "checkpoints" / "last.ckpt"


def test_exported_checkpoint_computes_and_samples_as_ours(compose_train, image_folder, tmp_path):
    ckpt = train_tiny(compose_train, image_folder, tmp_path,
                      ["model.net.attention_resolutions=[8]", "model.net.num_head_channels=4"])  # 2 and 4 heads

    # The CLI: the checkpoint's EMA weights, loadable as a DDPMPipeline.
    env = {**os.environ, "DIFFUSION_LIGHTNING_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "DL_ROOT_DIR": str(tmp_path)}
    cli = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "diffusion_lightning.export", f"ckpt={ckpt}", f"out={cli}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote diffusers DDPMPipeline" in proc.stdout
    model = model_from_checkpoint(ckpt)
    ours, theirs = outputs(model.net, UNet2DModel.from_pretrained(cli, subfolder="unet"))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    pipe = DDPMPipeline.from_pretrained(cli)
    config = pipe.scheduler.config
    assert (config.num_train_timesteps, config.prediction_type, config.variance_type) == (T, "epsilon", "fixed_small")
    assert config.clip_sample and config.clip_sample_range == 1.0 and config.timestep_spacing == "linspace"
    torch.testing.assert_close(pipe.scheduler.betas, model.diffusion.betas.float(), atol=0, rtol=0)

    # The function, on perturbed weights: the same network function ...
    perturb(model.net)
    out = export_model(model, tmp_path / "perturbed")
    unet = UNet2DModel.from_pretrained(out, subfolder="unet")
    assert_same_outputs(model.net, unet)
    # ... which a wrong mapping would break: swapped q and k of one attention block
    attn = unet.mid_block.attentions[0]
    with torch.no_grad():
        q = attn.to_q.weight.clone()
        attn.to_q.weight.copy_(attn.to_k.weight)
        attn.to_k.weight.copy_(q)
    ours, theirs = outputs(model.net, unet)
    assert not torch.allclose(theirs, ours, atol=1e-3)

    # ... and the same samples: DDIM over every timestep (linspace) and over ddim10 (leading), ancestral DDPM.
    pipe = DDPMPipeline.from_pretrained(out)
    assert_same_ddim(model, pipe, "linspace", T, T)
    assert_same_ddim(model, pipe, "leading", 10, "ddim10")
    assert_same_ddpm(model, pipe, 10)


@pytest.mark.parametrize(("prediction_type", "variance_type", "diffusers_type"), [
    ("v", "fixed_large", "v_prediction"), ("x0", "fixed_small", "sample"),
])  # fmt: skip
def test_prediction_and_variance_types_sample_as_ours(prediction_type, variance_type, diffusers_type, tmp_path):
    model = DDPM(UNet(**SMALL), num_timesteps=T, beta_schedule="cosine", prediction_type=prediction_type,
                 variance_type=variance_type, channels_last=False, compile=False).eval()
    perturb(model.net, seed=1)
    pipe = DDPMPipeline.from_pretrained(export_model(model, tmp_path / "pipe", net_config=SMALL))
    assert (pipe.scheduler.config.prediction_type, pipe.scheduler.config.variance_type) == (diffusers_type,
                                                                                             variance_type)
    assert_same_ddim(model, pipe, "leading", 10, "ddim10")
    assert_same_ddpm(model, pipe, 10)


@pytest.mark.parametrize("extra", [
    dict(num_classes=3),
    dict(num_heads=2, num_head_channels=-1),  # one attention width (16): 2 heads of 8
    dict(channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[8, 2], num_head_channels=-1),
    dict(channel_mult=[1, 2, 2], num_res_blocks=2, use_scale_shift_norm=True, resblock_updown=True),
], ids=["classes", "num-heads", "three-levels", "scale-shift-resblock-updown"])
def test_unet_options_map(extra):
    config = {**SMALL, **extra}
    net = UNet(**config)
    perturb(net, seed=2)
    y = torch.tensor([0, 1, 2, 3]) if "num_classes" in extra else None  # 3: the guidance null class
    assert_same_outputs(net, to_diffusers_unet(net, config), y)


def test_learned_variance_checkpoint_is_refused(compose_train, image_folder, tmp_path):
    ckpt = train_tiny(compose_train, image_folder, tmp_path,
                      ["model=iddpm", "model.net.out_channels=2", "model.net.attention_resolutions=[]"])
    with pytest.raises(UserError, match="model.variance_type=learned_range"):
        export_model(model_from_checkpoint(ckpt), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_models_and_layouts_are_refused(tmp_path):
    with pytest.raises(UserError, match="ContinuousDiffusion checkpoint: only pixel DDPM checkpoints export"):
        export_model(ContinuousDiffusion(UNet(**SMALL), channels_last=False), tmp_path, net_config=SMALL)
    wide = {**SMALL, "channel_mult": [2, 2]}
    with pytest.raises(UserError, match=r"channel_mult=\[2, 2\]"):
        export_model(DDPM(UNet(**wide), num_timesteps=T, channels_last=False), tmp_path, net_config=wide)
    heads = {**SMALL, "attention_resolutions": [8], "num_heads": 2, "num_head_channels": -1}  # widths 8 and 16
    with pytest.raises(UserError, match="num_heads=2"):
        export_model(DDPM(UNet(**heads), num_timesteps=T, channels_last=False), tmp_path, net_config=heads)
    assert not any(tmp_path.iterdir())
