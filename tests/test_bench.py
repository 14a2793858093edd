"""`make bench` end to end at a tiny size: it measures `make train`'s model and writes figures that agree."""

from __future__ import annotations

import json

from hydra.utils import instantiate

from diffusion_lightning import bench


def test_bench_measures_the_default_model_and_writes_consistent_figures(compose_train, tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main([
        "--out", str(out), "--batch", "2", "--steps", "2", "--warmup", "1", "--repeats", "1", "--sample-batch", "2",
        "--classifier-batch", "4", "--inception-batch", "2", "--nll-images", "1",
    ])
    assert json.loads(out.read_text()) == result

    # the network `make train` trains, composed independently of bench.py
    cfg = compose_train(["experiment=ddpm_fmnist"])
    assert result["model"]["experiment"] == "ddpm_fmnist"
    assert result["model"]["params"] == sum(p.numel() for p in instantiate(cfg.model).parameters())
    assert result["model"]["net"]["num_groups"] == cfg.model.net.num_groups

    train = result["train"]
    assert train["runs"] == {"lightning": [train["lightning_images_per_s"]], "plain": [train["plain_images_per_s"]]}
    assert train["lightning_images_per_s"] > 0 and train["plain_images_per_s"] > 0
    ratio = train["lightning_images_per_s"] / train["plain_images_per_s"]
    assert abs(train["lightning_over_plain"] - ratio) < 1e-3 * ratio

    # the full T-term bound costs T forwards an image, the stratified estimate 20: the projection must say so
    nll = result["nll"]
    assert nll["num_timesteps"] == cfg.model.num_timesteps
    assert nll["test_10k_full_s"] > nll["test_10k_stratified_s"] > 0

    assert result["sample"]["images_per_s"] > 0
    assert result["features"]["fmnist-classifier"]["images_per_s"] > 0
    inception = result["features"]["inception"]
    assert inception["images_per_s"] is not None or "make inception-weights" in inception["skipped"]
