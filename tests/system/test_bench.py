"""`make bench` end to end at a tiny size: it measures `make train`'s model, against a plain loop and diffusers, and
writes figures that agree with each other and with the configs."""

from __future__ import annotations

import json

import pytest
from hydra.utils import instantiate

from diffusion_lightning import bench, cpu_precision


def test_bench_measures_the_default_model_and_writes_consistent_figures(compose_train, tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "results.json"
    result = bench.main([
        "--out", str(out), "--device", "cpu", "--models", "default", "--batch", "2", "--steps", "2", "--warmup", "1",
        "--repeats", "2", "--samplers", "ddim,heun", "--sample-steps", "3", "--sample-batch", "2",
        "--classifier-batch", "4", "--inception-batch", "2", "--nll-images", "1",
    ])
    assert json.loads(out.read_text()) == result
    table = out.with_suffix(".md").read_text()
    assert "| default (ddpm_fmnist) | 1.06M | 2 |" in table

    # the network `make train` trains, composed independently of bench.py
    cfg = compose_train(["experiment=ddpm_fmnist"])
    train = result["train"]["default"]
    assert train["experiment"] == "ddpm_fmnist"
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
    assert train["lightning_over_diffusers"] == pytest.approx(ips["lightning"] / ips["diffusers"], rel=1e-3)
    # peak memory of CPU training, measured in fresh processes: the whole process, and the slope per image
    assert train["peak_memory_mib"] > 100 and train["peak_memory_mib_per_image"] >= 0  # batch 2 vs 1: within noise
    # forward + backward of a 1.06M conv net on 32x32: far more than 3 x (2 x params) x pixels / 10, less than 10x it
    assert 1e8 < train["train_flops_per_image"] < 1e10

    # Heun costs 2 NFE a step but the last (Karras Alg. 2), DDIM 1
    nfe = {r["sampler"]: r["nfe"] for r in result["sample"]}
    assert nfe == {"ddim": 3, "heun": 5}
    assert all(r["images_per_s"] > 0 for r in result["sample"])

    nll = result["nll"]
    assert nll["num_timesteps"] == cfg.model.num_timesteps
    assert nll["test_10k_full_s"] > nll["test_10k_stratified_s"] > 0
    assert result["features"]["fmnist-classifier"]["images_per_s"] > 0
    inception = result["features"]["inception"]
    assert inception["images_per_s"] is not None or "make inception-weights" in inception["skipped"]


def test_flops_per_image_scales_with_the_network() -> None:
    """The 35.7M CIFAR U-Net costs about 6.1 G multiply-adds per image forward (the figure quoted for Ho et al.'s
    layout at 32x32), 12 GFLOP, and the backward twice that: about 37 GFLOP a training image; the default model a
    small fraction of that."""
    cifar, default = bench.flops_per_image("cifar", batch=1), bench.flops_per_image("default", batch=1)
    assert 33e9 < cifar < 40e9
    assert default < cifar / 10
