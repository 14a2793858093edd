"""`make bench` end to end at a tiny size: it measures recipes through their own training step (a student with its
teacher, a latent recipe with its first stage, the default against a plain loop and diffusers) and writes figures
that agree with each other, with the configs and with what a step computes."""

from __future__ import annotations

import json

import pytest
from hydra.utils import instantiate

from diffusion_lightning import cpu_precision
from diffusion_lightning.bench import suite
from diffusion_lightning.bench.recipes import build, fmnist_experiments
from diffusion_lightning.bench.training import flops_per_image


def test_bench_measures_recipes_and_writes_consistent_figures(compose_train, tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "results.json"
    result = suite.main([
        "--out", str(out), "--device", "cpu", "--recipes", "ddpm_fmnist", "--networks", "ddpm_cifar,ldm_fmnist",
        "--batch", "2", "--steps", "2", "--warmup", "1", "--repeats", "2", "--samplers", "ddim,heun",
        "--sample-steps", "3", "--sample-batch", "2", "--recipe-sample-batch", "2", "--classifier-batch", "4",
        "--inception-batch", "2", "--nll-images", "2", "--nll-full-images", "0",
    ])  # fmt: skip
    assert json.loads(out.read_text()) == result
    table = out.with_suffix(".md").read_text()
    assert "| ddpm_fmnist | DDPM | 1.06M | 0.00M | 2 |" in table
    assert "/work" not in table and "/home" not in table and "/tmp" not in table  # no machine paths

    # the network `make train` trains, composed independently of the benchmark
    cfg = compose_train(["experiment=ddpm_fmnist"])
    train = result["train"]["ddpm_fmnist"]
    assert train["params"] == sum(p.numel() for p in instantiate(cfg.model).parameters())
    # the CPU's own default precision (bf16-mixed where it computes bfloat16 natively), eager, contiguous
    assert result["settings"] == {**result["settings"], "precision": cpu_precision(), "compile": False,
                                  "channels_last": False}
    fp32_recipe = {"diffusers_fp32"} if cpu_precision() != "32-true" else set()
    assert set(train["runs"]) == {"lightning", "plain", "diffusers"} | fp32_recipe
    assert all(len(v) == 2 and min(v) > 0 for v in train["runs"].values())
    ips = train["images_per_s"]
    assert ips["lightning"] == pytest.approx(sum(train["runs"]["lightning"]) / 2, abs=0.01)  # median of two
    # the ratio of the unrounded medians against that of the medians rounded to 0.01 img/s (few img/s when loaded)
    rounding = 0.005 * (1 + ips["lightning"] / ips["plain"]) / ips["plain"]
    assert train["lightning_over_plain"] == pytest.approx(ips["lightning"] / ips["plain"], abs=rounding + 1e-4)
    assert train["lightning_over_diffusers"] == pytest.approx(ips["lightning"] / ips["diffusers"], abs=rounding + 1e-3)
    # peak memory of CPU training, measured in fresh processes: the whole process, and the slope per image
    assert train["peak_memory_mib"] > 100 and train["peak_memory_mib_per_image"] >= 0  # batch 2 vs 1: within noise

    # the latent recipe (counted, not timed): its frozen autoencoder apart, and a step far cheaper than the pixel
    # model's (the same U-Net width on 8x8x4 latents; the encoder's forward included)
    ldm = result["networks"]["ldm_fmnist"]
    assert ldm["recipe"] == "DDPM" and ldm["frozen_params"] > 0.5e6
    assert ldm["train_flops_per_image"] < train["train_flops_per_image"] / 3

    # forward + backward of the 35.7M CIFAR U-Net: about 6.1 G multiply-adds forward (the figure quoted for Ho et
    # al.'s layout at 32x32), 12 GFLOP, and the backward twice that
    assert 33e9 < result["networks"]["ddpm_cifar"]["train_flops_per_image"] < 40e9

    # the recipe with its own sampler (DDPM's 100 ancestral steps), then the sampler sweep: Heun costs 2 NFE a step
    # but the last (Karras Alg. 2), DDIM 1
    assert (result["sample"][0]["experiment"], result["sample"][0]["nfe"]) == ("ddpm_fmnist", cfg.sampler.steps)
    assert {r["sampler"]: r["nfe"] for r in result["sample"][1:]} == {"ddim": 3, "heun": 5}
    assert all(r["images_per_s"] > 0 for r in result["sample"])

    (nll,) = result["nll"]
    assert nll["experiment"] == "ddpm_fmnist" and nll["num_timesteps"] == cfg.model.num_timesteps
    assert nll["test_10k_stratified_s"] > 0 and "test_10k_full_s" not in nll  # the all-T bound not timed (0 images)
    assert result["features"]["fmnist-classifier"]["images_per_s"] > 0
    inception = result["features"]["inception"]
    assert inception["images_per_s"] is not None or "make inception-weights" in inception["skipped"]


def test_a_students_step_counts_its_teachers_calls() -> None:
    """A progressive-distillation step is the student's forward and backward (about 3 forward passes' FLOPs) plus two
    DDIM steps of its teacher (2 more): 5/3 of its teacher recipe's step (vdiff_fmnist, the same U-Net)."""
    student, teacher = flops_per_image("pd_fmnist", batch=1), flops_per_image("vdiff_fmnist", batch=1)
    assert student / teacher == pytest.approx(5 / 3, rel=0.03)


def test_every_fmnist_recipe_builds_without_checkpoints() -> None:
    """The benchmark times recipes whose teacher or first stage is another run: it builds those untrained."""
    experiments = fmnist_experiments()
    assert {"ddpm_fmnist", "pd_fmnist", "cd_fmnist", "ldm_fmnist", "lict_fmnist", "ae_fmnist"} <= set(experiments)
    for spec in ("cd_fmnist", "lict_fmnist"):
        model = build(spec)
        assert sum(p.numel() for p in model.parameters() if not p.requires_grad) > 0, spec
