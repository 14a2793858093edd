"""The evaluation entry on a tiny trained checkpoint (FID/KID/IS, NLL, a Hydra -m sweep) and the report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, QUIET, ROOT, TINY_NET
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

from diffusion_lightning import evaluate as evaluate_mod
from diffusion_lightning.checkpoint import model_from_checkpoint
from diffusion_lightning.diffusion import documented_nfe, sampling_sigmas
from diffusion_lightning.metrics import (
    ReferenceStats,
    SampleQuality,
    feature_statistics,
    frechet_distance,
    get_extractor,
)
from diffusion_lightning.metrics.reference import REFERENCE_DIR_ENV_VAR, reference_cache_path
from diffusion_lightning.report import fid_curves, load_results, write_report
from diffusion_lightning.report import main as report_main
from diffusion_lightning.train import train

NUM_TIMESTEPS = 50


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 steps of ddpm_fmnist (28x28x1 Fashion-MNIST, batch 8, tiny net, T=50)."""
    out = tmp_path_factory.mktemp("train")
    GlobalHydra.instance().clear()
    overrides = [
        "experiment=ddpm_fmnist", *TINY_NET, *QUIET, "trainer.max_steps=2", "data.batch_size=8", "data.num_workers=0",
        "trainer.limit_val_batches=0", "callbacks.sample_grid=null", "callbacks.ema.decay=0.9", "logger=csv",
        f"model.num_timesteps={NUM_TIMESTEPS}", "sampler.steps=20",  # the model's own sampler fits T=50
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir, cfg.paths.output_dir = str(ROOT), str(out)
        del cfg["hydra"]
    train(cfg)
    GlobalHydra.instance().clear()
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture
def ref_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(REFERENCE_DIR_ENV_VAR, str(tmp_path / "reference_stats"))
    return tmp_path / "reference_stats"


FID_ARGS = ["metric=fid", "extractor=fmnist-classifier", "sampler=ddim", "sampler.steps=3", "num_samples=32",
            "batch_size=16", "reference_images=64", "kid_subset_size=32"]  # fmt: skip


def _cached_reference(ref_dir: Path) -> ReferenceStats:
    path = reference_cache_path(ref_dir, "FashionMNIST", "train", "fmnist-classifier", 28, 64)
    return ReferenceStats.from_tensors(torch.load(path, weights_only=True))


def test_fid_line(compose_train, checkpoint, ref_dir, tmp_path):
    results = tmp_path / "results.jsonl"
    cfg = compose_train([f"ckpt={checkpoint}", *FID_ARGS, f"results={results}", "save_npz=true"], "evaluate")
    evaluate_mod.evaluate(cfg)
    (record,) = load_results(results)
    assert record["metric"] == "fid" and record["experiment"] == "ddpm_fmnist" and record["global_step"] == 2
    assert (record["sampler"], record["steps"], record["nfe"], record["num_samples"]) == ("ddim", 3, 3, 32)
    assert record["ema"] is True and record["seed"] == 0 and record["wall_s"] > 0
    assert record["reference"] == {"split": "train", "num_images": 64, "extractor": "fmnist-classifier"}
    for key in ("fid", "kid", "kid_std", "is", "is_std"):
        assert math.isfinite(record[key]), key
    assert record["fid"] > 0 and 1.0 <= record["is"] <= 10.0

    # the recorded FID is the FID of the saved uint8 samples against the cached reference (evaluate's cache dir) ...
    samples = torch.from_numpy(np.load(Path(cfg.paths.output_dir) / "samples.npz")["samples"]).permute(0, 3, 1, 2)
    assert samples.shape == (32, 1, 28, 28) and samples.dtype == torch.uint8
    extractor = get_extractor("fmnist-classifier")
    ref = _cached_reference(ref_dir)
    mu, sigma = feature_statistics(extractor(samples)["features"])
    assert record["fid"] == pytest.approx(frechet_distance(mu, sigma, ref.mu, ref.sigma), rel=1e-6)  # batching
    # ... and what the training callback's torchmetrics engine computes for the same images
    quality = SampleQuality(extractor, kid_subset_size=32, kid_subsets=2)
    quality.set_reference(ref)
    quality.update(samples)
    assert quality.compute()["fid"] == pytest.approx(record["fid"], rel=1e-6)

    # a second evaluation appends (same reference file, reused)
    evaluate_mod.evaluate(compose_train([f"ckpt={checkpoint}", *FID_ARGS, f"results={results}", "ema=false"],
                                        "evaluate"))  # fmt: skip
    records = load_results(results)
    assert len(records) == 2 and records[1]["ema"] is False and records[1]["fid"] != record["fid"]


def test_bf16_sampling_is_recorded_and_close_to_float32(compose_train, checkpoint, ref_dir, tmp_path):
    """``precision=bf16`` runs the network under bfloat16 autocast (the sampler's state stays float32): the samples
    from the same noise stay within bfloat16's resolution of the float32 ones, and the record says which it was."""
    from diffusion_lightning.errors import UserError
    from diffusion_lightning.utils import generate

    model = model_from_checkpoint(checkpoint)
    draws = [generate(model, 8, 8, torch.Generator().manual_seed(0), {"name": "ddim", "steps": 3},
                      precision=p)[0] for p in ("32", "bf16")]  # fmt: skip
    assert draws[0].dtype == draws[1].dtype == torch.float32
    diff = (draws[0] - draws[1]).abs()
    assert 0 < diff.max() < 0.1 and diff.mean() < 0.01
    with pytest.raises(UserError, match="use 32 or bf16"):
        generate(model, 2, 2, torch.Generator(), precision="fp8")
    results = tmp_path / "results.jsonl"
    evaluate_mod.evaluate(compose_train([f"ckpt={checkpoint}", *FID_ARGS, f"results={results}", "precision=bf16"],
                                        "evaluate"))  # fmt: skip
    (record,) = load_results(results)
    assert record["precision"] == "bf16" and record["sampling_ms_per_image"] > 0


def test_bad_sampler_settings_fail_before_any_work(compose_train, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_mod, "load_or_compute_reference_stats", None)  # must not be reached
    cfg = compose_train([f"ckpt={checkpoint}", *FID_ARGS, "+sampler.variance_type=fixed_large"], "evaluate")
    with pytest.raises(evaluate_mod.UserError, match="sampler 'ddim' has no option variance_type; it takes: steps"):
        evaluate_mod.evaluate(cfg)


def test_fid_of_real_images_against_themselves_is_zero(compose_train, checkpoint, ref_dir, tmp_path, monkeypatch):
    """Through evaluate_fid: 'samples' that are the reference images themselves give FID ~ 0 (more images than
    feature dimensions, so the covariances are full rank)."""
    from diffusion_lightning.data import FashionMNISTDataModule

    train_split = FashionMNISTDataModule(root=str(ROOT / "data")).dataset("train")
    real = torch.stack([train_split[i][0] for i in range(256)])
    monkeypatch.setattr(evaluate_mod, "generate", lambda model, n, *args, **kwargs: (real[:n], 1, None))
    results = tmp_path / "real.jsonl"
    args = [f"ckpt={checkpoint}", *FID_ARGS, "num_samples=256", "reference_images=256", f"results={results}"]
    record = evaluate_mod.evaluate(compose_train(args, "evaluate"))
    assert abs(record["fid"]) < 1e-6, record["fid"]


def test_nll_lines(compose_train, checkpoint, tmp_path):
    results = tmp_path / "nll.jsonl"
    base = [f"ckpt={checkpoint}", "metric=nll", "nll.num_images=4", "nll.batch_size=4", f"results={results}"]
    full = evaluate_mod.evaluate(compose_train(base, "evaluate"))
    strata = evaluate_mod.evaluate(compose_train([*base, "nll.num_strata=5"], "evaluate"))
    lines = load_results(results)
    assert [r["estimator"] for r in lines] == ["full", "stratified-5"] and lines[0] == json.loads(json.dumps(full))
    for r in lines:
        assert r["metric"] == "nll" and r["num_images"] == 4 and r["split"] == "test" and "sampler" not in r
        assert math.isfinite(r["bpd"]) and r["bpd"] > 0 and r["bpd_stderr"] > 0
    terms = json.loads(Path(full["terms_file"]).read_text())
    assert len(terms["per_step_bpd"]) == NUM_TIMESTEPS
    # the full bound is the sum of its terms; the stratified estimate is an unbiased estimate of it
    assert full["bpd"] == pytest.approx(sum(terms["per_step_bpd"]) + terms["prior_bpd"], rel=1e-6)
    assert strata["bpd"] == pytest.approx(full["bpd"], rel=0.5)


def test_nll_variance_override_and_clip(compose_train, checkpoint, tmp_path):
    """A fixed-variance model's bound under either fixed variance; clipping x_0 is recorded and changes the bound."""
    results = tmp_path / "r.jsonl"
    base = [f"ckpt={checkpoint}", "metric=nll", "nll.num_images=4", "nll.batch_size=4", f"results={results}"]
    runs = {
        (v, clip): evaluate_mod.evaluate(
            compose_train([*base, f"nll.variance_type={v}", f"nll.clip_denoised={clip}"], "evaluate")
        )
        for v in ("fixed_small", "fixed_large")
        for clip in ("true", "false")
    }
    for (v, clip), r in runs.items():
        assert r["variance_type"] == v and r["clip_denoised"] == (clip == "true") and math.isfinite(r["bpd"])
    # same seed, same noise: only the reverse variance (or the clipping) differs between two runs
    assert runs["fixed_small", "true"]["bpd"] != runs["fixed_large", "true"]["bpd"]
    assert runs["fixed_small", "true"]["bpd"] != runs["fixed_small", "false"]["bpd"]
    with pytest.raises(evaluate_mod.UserError, match="fixed_small or fixed_large"):
        evaluate_mod.evaluate(compose_train([*base, "nll.variance_type=learned_range"], "evaluate"))


def test_hydra_sweep_writes_one_line_per_job(checkpoint, tmp_path):
    """A sweep over samplers and step counts: one line per job, each with the NFE counted from the denoiser calls,
    equal to the sampler's documented cost on the grid it ran (Heun: 2N - 1 on the Karras grid, others N). A
    single-valued sampler key beside the swept group (``sampler.clip_denoised=true``) is merged into every job."""
    results = tmp_path / "sweep.jsonl"
    env = {**os.environ, "DIFFUSION_LIGHTNING_OFFLINE": "1", REFERENCE_DIR_ENV_VAR: str(tmp_path / "ref")}
    args = [
        "-m", f"ckpt={checkpoint}", "metric=fid", "extractor=fmnist-classifier", "sampler=ddim,dpmpp,heun,ddpm",
        "sampler.steps=2,3", "sampler.clip_denoised=true", "num_samples=16", "batch_size=16", "reference_images=32",
        "kid_subset_size=16",
        f"results={results}", f"paths.data_dir={ROOT / 'data'}",
    ]  # fmt: skip
    proc = subprocess.run(  # run from tmp_path: the sweep folder is resolved from the working directory
        [sys.executable, "-m", "diffusion_lightning.evaluate", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = load_results(results)
    assert sorted((r["sampler"], r["steps"]) for r in records) == [
        (s, n) for s in ("ddim", "ddpm", "dpmpp", "heun") for n in (2, 3)
    ]  # fmt: skip
    denoiser = model_from_checkpoint(checkpoint).denoiser()
    for r in records:
        grid = sampling_sigmas(denoiser, r["steps"], r["sampler_options"]["grid"])
        assert r["nfe"] == documented_nfe(r["sampler"], len(grid) - 1), r
    assert {r["nfe"] for r in records if r["sampler"] == "heun"} == {3, 5}
    assert all(r["num_samples"] == 16 and math.isfinite(r["fid"]) for r in records)
    assert len(list((tmp_path / "outputs" / "evaluate" / "multirun").glob("*/[0-7]"))) == 8  # one job folder each


# ------------------------------------------------------------------------------------------------------- report
def _synthetic_results(path: Path) -> None:
    reference = {"split": "train", "num_images": 60000, "extractor": "inception"}
    base = {"experiment": "ddpm_fmnist", "global_step": 2000, "ema": True, "metric": "fid", "num_samples": 1000}
    base["reference"] = reference
    lines = [
        {**base, "sampler": s, "steps": n, "nfe": 2 * n - 1 if s == "heun" else n, "fid": 100.0 / n + k,
         "kid": 0.01 / n, "kid_std": 0.001, "is": 7.5, "is_std": 0.1, "wall_s": 3.2 * n}
        for k, s in enumerate(("ddim", "dpmpp", "heun")) for n in (10, 20, 50)
    ]  # fmt: skip
    lines.append({**base, "sampler": "ddim", "steps": 10, "nfe": 10, "fid": 9.0, "kid": None, "is": None})  # rerun
    lines.append({**base, "global_step": 4000, "sampler": "ddim", "steps": 10, "nfe": 10, "fid": 7.0, "kid": 0.002,
                  "kid_std": 0.0001, "is": None, "is_unavailable": "no logits", "wall_s": 30.0})  # fmt: skip
    nll = {"metric": "nll", "bpd": 3.71, "bpd_stderr": 0.02, "num_images": 100, "split": "test", "estimator": "full"}
    lines.append({"experiment": "ddpm_fmnist", "global_step": 2000, "ema": True, **nll, "wall_s": 12.0})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")


def test_report_table_and_plot(tmp_path):
    results = tmp_path / "results.jsonl"
    _synthetic_results(results)
    paths = write_report(results, tmp_path / "report")
    md = paths["markdown"].read_text()
    table = [line for line in md.splitlines() if line.startswith("| ddpm_fmnist")]
    assert len(table) == 12  # 11 FID rows + 1 NLL row, one per evaluation
    assert ("| experiment | step | EMA | sampler | steps | NFE | samples | features | FID | "
            "KID (raw MMD², not ×1000) | IS | wall time |") in md
    assert ("| ddpm_fmnist | 2000 | yes | heun | 10 | 19 | 1000 | inception | 12.00 | 0.001 ± 0.001 | 7.50 ± 0.10 "
            "| 32.0 s |") in md  # fmt: skip
    assert "| ddpm_fmnist | 4000 | yes | ddim | 10 | 10 | 1000 | inception | 7.00 | 0.002 ± 0.0001 | – | 30.0 s |" in md
    assert "3.7100 ± 0.0200" in md and "![FID against NFE](fid_vs_nfe.png)" in md
    curves = fid_curves(load_results(results))
    assert curves["ddpm_fmnist @ 2000: ddim (inception)"] == [(10, 9.0), (20, 5.0), (50, 2.0)]  # rerun replaces NFE 10
    assert curves["ddpm_fmnist @ 2000: heun (inception)"] == [(19, 12.0), (39, 7.0), (99, 4.0)]
    assert len(curves) == 4
    with Image.open(paths["plot"]) as img:
        assert img.format == "PNG" and img.size[0] > 300


def test_report_cli(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    _synthetic_results(results)
    report_main(["--results", str(results), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "fid_vs_nfe.png").is_file()
    with pytest.raises(SystemExit) as exc:
        report_main(["--results", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "evaluate" in capsys.readouterr().err
