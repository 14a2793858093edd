"""SampleMetrics: torchmetrics FID/KID/IS on our extractors, equal to evaluate.py's numbers, under 2-process DDP,
in a tiny Fashion-MNIST training run (reference statistics cached under tmp, shipped classifier weights)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import QUIET, ROOT, TINY_NET
from PIL import Image
from torchvision.utils import save_image

from diffusion_lightning.callbacks import SampleMetrics, ema_module
from diffusion_lightning.callbacks.metrics import rank_share
from diffusion_lightning.metrics import (
    ReferenceStats,
    SampleQuality,
    compute_reference_stats,
    feature_statistics,
    frechet_distance,
    from_uint8,
    get_extractor,
    kernel_inception_distance,
)
from diffusion_lightning.metrics.reference import REFERENCE_DIR_ENV_VAR, reference_cache_path
from diffusion_lightning.train import train
from diffusion_lightning.utils import generate


def _images(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 1, 32, 32), generator=g).float() * scale).to(torch.uint8)


def _reference(extractor) -> ReferenceStats:
    return compute_reference_stats([from_uint8(_images(200, 0))], extractor, keep_features=True)  # 200 > D


def _evaluate_py_fid(extractor, images: torch.Tensor, ref: ReferenceStats) -> float:
    """FID as evaluate.evaluate_fid computes it."""
    mu, sigma = feature_statistics(extractor(images)["features"])
    return frechet_distance(mu, sigma, ref.mu, ref.sigma)


def test_sample_quality_matches_evaluate_py():
    extractor = get_extractor("fmnist-classifier")
    ref = _reference(extractor)
    fake = _images(100, 1, scale=0.6)
    quality = SampleQuality(extractor, kid_subset_size=100, kid_subsets=3)
    quality.set_reference(ref)
    quality.update(fake)
    values = quality.compute(seed=0)
    assert values["fid"] == pytest.approx(_evaluate_py_fid(extractor, fake, ref), rel=1e-7)  # fake: n < D
    # KID: with subsets covering both (equal-size) sets the random subsets do not matter
    same_size = _images(200, 1, scale=0.6)
    full = SampleQuality(extractor, kid_subset_size=200, kid_subsets=2)
    full.set_reference(ref)
    full.update(same_size)
    ours, _ = kernel_inception_distance(extractor(same_size)["features"], ref.features, subsets=1, subset_size=200)
    assert full.compute(seed=0)["kid"] == pytest.approx(ours, rel=1e-9)
    assert values["kid"] > 0 and 1.0 <= values["is"] <= 10.0 and math.isfinite(values["is_std"])
    # the real images themselves: FID ~ 0; the reference survives reset()
    quality.reset()
    quality.update(_images(200, 0))
    assert abs(quality.compute()["fid"]) < 1e-6


class _NoLogits:
    """An extractor without classifier head (like the converted Inception weights)."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.feature_dim, self.num_classes = inner, "no-logits", inner.feature_dim, None
        self.has_logits = False

    def require_logits(self) -> None:
        raise RuntimeError("IS unavailable")

    def __call__(self, images: torch.Tensor) -> dict:
        return {"features": self.inner(images)["features"], "logits": None}


def test_sample_quality_without_logits_skips_is():
    extractor = _NoLogits(get_extractor("fmnist-classifier"))
    quality = SampleQuality(extractor, kid_subset_size=50, kid_subsets=2)
    assert quality.inception_score is None
    quality.set_reference(_reference(extractor.inner))
    quality.update(_images(50, 3))
    assert set(quality.compute()) == {"fid", "kid", "kid_std"}


# ------------------------------------------------------------------------------------------------ 2-process DDP
def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        extractor = get_extractor("fmnist-classifier")
        quality = SampleQuality(extractor, kid_subset_size=50, kid_subsets=5)
        quality.set_reference(_reference(extractor) if rank == 0 else None)
        fake = _images(101, 1, scale=0.6)  # 101: uneven shares (51 + 50)
        start = sum(rank_share(101, r, world) for r in range(rank))
        for _ in range(2):  # two evaluations: the reference must survive reset() on every rank
            quality.update(fake[start : start + rank_share(101, rank, world)])
            values = quality.compute(seed=0)
            quality.reset()
        Path(f"{out}.{rank}").write_text(json.dumps(values))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_give_the_single_process_numbers(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path / "out")), nprocs=2, join=True)
    ranks = [json.loads(Path(f"{tmp_path / 'out'}.{r}").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank computes the same synchronised values

    extractor = get_extractor("fmnist-classifier")
    quality = SampleQuality(extractor, kid_subset_size=50, kid_subsets=5)
    ref = _reference(extractor)
    quality.set_reference(ref)
    fake = _images(101, 1, scale=0.6)
    quality.update(fake)
    single = quality.compute(seed=0)
    for key in ("fid", "kid", "kid_std", "is", "is_std"):  # same gathered order and seed: same KID subsets, IS splits
        assert ranks[0][key] == pytest.approx(single[key], rel=1e-6), key
    assert ranks[0]["fid"] == pytest.approx(_evaluate_py_fid(extractor, fake, ref), rel=1e-6)


# ------------------------------------------------------------------------------------------------ quantisation
def test_samples_are_quantised_like_saved_pngs(tmp_path):
    from diffusion_lightning.models import DDPM
    from diffusion_lightning.nets import UNet

    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), dropout=0.0, num_groups=4)  # fmt: skip
    model = DDPM(net, num_timesteps=40)
    ddim3 = {"name": "ddim", "steps": 3}
    uint8, _ = generate(model, 5, 2, torch.Generator().manual_seed(3), ddim3, uint8=True)
    floats = torch.cat([model.sample(n, generator=g, sampler=ddim3) for g in [torch.Generator().manual_seed(3)]
                        for n in (2, 2, 1)])  # fmt: skip
    for i in range(5):
        save_image((floats[i] + 1) / 2, tmp_path / f"{i}.png")
        png = np.asarray(Image.open(tmp_path / f"{i}.png").convert("L"))
        np.testing.assert_array_equal(uint8[i, 0].numpy(), png)


# ------------------------------------------------------------------------------------------------ training runs
def _metrics_overrides(ref_dir: Path, every_n_steps: int = 2) -> list[str]:
    return [
        "experiment=ddpm_fmnist", *TINY_NET, *QUIET, "trainer.max_steps=2", "data.batch_size=8", "data.num_workers=0",
        "trainer.limit_val_batches=0", "callbacks.sample_grid=null", "callbacks.ema.decay=0.9", "logger=csv",
        "model.num_timesteps=50", "+callbacks@callbacks.metrics=metrics",
        "callbacks.metrics.extractor=fmnist-classifier",
        "callbacks.metrics.num_samples=24", "callbacks.metrics.batch_size=16", "sampler.steps=2",
        f"callbacks.metrics.every_n_steps={every_n_steps}", "callbacks.metrics.every_n_epochs=0",
        "callbacks.metrics.reference_images=64", f"callbacks.metrics.reference_dir={ref_dir}",
        "callbacks.metrics.kid_subsets=10",
    ]  # fmt: skip


def test_callback_logs_finite_metrics_in_a_training_run(compose_train, tmp_path):
    cfg = compose_train(_metrics_overrides(tmp_path / "ref", every_n_steps=1) + ["trainer.log_every_n_steps=1"])
    out = train(cfg)
    trainer = out["trainer"]
    callback = next(c for c in trainer.callbacks if isinstance(c, SampleMetrics))
    for key in ("fid", "kid", "kid_std", "is", "is_std"):
        assert math.isfinite(float(trainer.callback_metrics[f"metrics/{key}"])), key
    rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "csv").rglob("metrics.csv").__next__().open()))
    logged = [(int(r["step"]), float(r["metrics/fid"])) for r in rows if r.get("metrics/fid")]
    assert [s for s, _ in logged] == [0, 1]  # after optimizer steps 1 and 2 (logger steps are 0-based)
    assert all(math.isfinite(v) and v > 0 for _, v in logged)

    # the cache file is evaluate.py's, and the logged FID is evaluate.py's FID of the same (regenerated) samples
    ref_file = reference_cache_path(tmp_path / "ref", "FashionMNIST", "train", "fmnist-classifier", 28, 64)
    assert ref_file.is_file()
    ref = ReferenceStats.from_tensors(torch.load(ref_file, weights_only=True))
    module = ema_module(trainer, out["model"])
    images, _ = generate(module, 24, 16, torch.Generator().manual_seed(0 + 0 + 1 * 2), uint8=True)  # its own sampler
    fid = _evaluate_py_fid(get_extractor("fmnist-classifier"), images, ref)
    assert callback.last_metrics["fid"] == pytest.approx(fid, rel=1e-6)


def test_callback_config_defaults_off_and_validates(compose_train):
    cfg = compose_train(["experiment=ddpm_fmnist"])
    assert cfg.callbacks.metrics is None
    with pytest.raises(ValueError, match="num_samples"):
        SampleMetrics(num_samples=1)


DDP_SCRIPT = """
import json, sys
import lightning as L, torch
from diffusion_lightning.callbacks import EMA, SampleMetrics
from diffusion_lightning.callbacks.metrics import rank_share
from diffusion_lightning.utils import generate
from diffusion_lightning.data import FashionMNISTDataModule
from diffusion_lightning.metrics import ReferenceStats, feature_statistics, frechet_distance, get_extractor
from diffusion_lightning.metrics.reference import reference_cache_path
from diffusion_lightning.models import DDPM
from diffusion_lightning.nets import UNet

out, ref_dir, data = sys.argv[1:4]
torch.set_num_threads(1)
L.seed_everything(0)
net = UNet(image_size=32, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
           attention_resolutions=(), dropout=0.0, num_groups=4)
model = DDPM(net, num_timesteps=50)
ema = EMA(decay=0.9)
metrics = SampleMetrics(every_n_epochs=0, every_n_steps=2, num_samples=15, batch_size=8, extractor="fmnist-classifier",
                        sampler={"name": "ddim", "steps": 2}, reference_images=40, reference_dir=ref_dir)
trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=2, limit_val_batches=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[ema, metrics])
trainer.fit(model, datamodule=FashionMNISTDataModule(root=data, batch_size=4, num_workers=0))
if trainer.global_rank == 0:
    module = ema.averaged_module()
    images = torch.cat([generate(module, rank_share(15, r, 2), 8, torch.Generator().manual_seed(r + 2 * 2),
                                 {"name": "ddim", "steps": 2}, uint8=True)[0] for r in range(2)])
    ref = ReferenceStats.from_tensors(torch.load(
        reference_cache_path(ref_dir, "FashionMNIST", "train", "fmnist-classifier", 32, 40), weights_only=True))
    mu, sigma = feature_statistics(get_extractor("fmnist-classifier")(images)["features"])
    json.dump({"logged": metrics.last_metrics, "fid": frechet_distance(mu, sigma, ref.mu, ref.sigma)}, open(out, "w"))
"""


@pytest.mark.slow
def test_callback_under_lightning_ddp(tmp_path):
    """Trainer(strategy="ddp", devices=2) on CPU: both ranks sample their share, the logged FID is the FID of the
    union of the shares against the cached reference."""
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out = tmp_path / "result.json"
    env = {**os.environ, "DIFFUSION_LIGHTNING_OFFLINE": "1", REFERENCE_DIR_ENV_VAR: str(tmp_path / "unused")}
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(tmp_path / "ref"), str(ROOT / "data")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["logged"]["fid"] == pytest.approx(result["fid"], rel=1e-6)
    assert math.isfinite(result["logged"]["kid"]) and math.isfinite(result["logged"]["is"])
