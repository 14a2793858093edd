"""Evaluation entry: ``python -m diffusion_lightning.evaluate ckpt=PATH metric=fid|nll [...]``.

Every evaluation appends one JSON line (checkpoint, EMA flag, sampler, steps/NFE, seed, sample
count, reference, every metric, wall time) to ``results`` (see conf/evaluate.yaml); ``-m`` sweeps
over checkpoints, samplers and step counts, locally or through the SLURM launcher.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.progress import track
from torch.utils.data import DataLoader, Subset

from .checkpoint import model_from_checkpoint
from .errors import UserError, run_entry
from .metrics import SampleQuality, get_extractor, load_or_compute_reference_stats, to_uint8
from .metrics.reference import dataset_key
from .utils import generate, resolve_device, run_or_exit


def datamodule_for(cfg: DictConfig, model: torch.nn.Module) -> Any:
    """The data the checkpoint was trained on (root from this run's ``paths``), or ``cfg.data``."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True) if cfg.data else dict(model.run_config["data"])
    data_cfg["root"] = data_cfg.get("root") if cfg.data else cfg.paths.data_dir
    data_cfg["num_workers"] = 0
    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def evaluate_nll(cfg: DictConfig, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """The variational bound in bits/dim (iDDPM eq. 4-7, prior L_T included) on the test split (``model.nll``)."""
    if not hasattr(model, "nll"):
        raise UserError(f"{type(model).__name__} has no likelihood bound: metric=nll needs a DDPM-family model")
    if model.first_stage.latent_shape is not None:
        raise UserError("metric=nll is the bound in bits per image dimension of a pixel model; this one diffuses "
                        "autoencoder latents, whose bound says nothing about images: use metric=fid")
    variance_type = model.nll_variance_type(cfg.nll.variance_type)  # a bad one fails here, before any data is read
    data = datamodule_for(cfg, model).dataset(cfg.nll.split)
    if cfg.nll.num_images is not None:
        data = Subset(data, range(min(int(cfg.nll.num_images), len(data))))
    loader = DataLoader(data, batch_size=cfg.nll.batch_size, shuffle=False)
    g = torch.Generator().manual_seed(cfg.seed) if device.type == "cpu" else None
    torch.manual_seed(cfg.seed)
    clip = bool(cfg.nll.clip_denoised)
    totals, priors, terms_sum = [], [], None
    for x0, y in track(loader, description=f"NLL on {len(data)} {cfg.nll.split} images"):
        out = model.nll(x0, y.to(device), num_strata=cfg.nll.num_strata, clip_denoised=clip,
                        variance_type=variance_type, generator=g)  # fmt: skip
        if not cfg.nll.num_strata:
            batch_terms = out["vb"].double().sum(0).cpu()
            terms_sum = batch_terms if terms_sum is None else terms_sum + batch_terms
            priors.append(out["prior_bpd"].cpu())
        totals.append(out["total_bpd"].double().cpu())
    total = torch.cat(totals)
    result: dict[str, Any] = {
        "bpd": total.mean().item(),
        "bpd_stderr": (total.std() / math.sqrt(len(total))).item() if len(total) > 1 else None,
        "num_images": len(total),
        "split": cfg.nll.split,
        "estimator": f"stratified-{cfg.nll.num_strata}" if cfg.nll.num_strata else "full",
        "clip_denoised": clip,
        "variance_type": variance_type,
    }
    if terms_sum is not None:
        terms = (terms_sum / len(total)).tolist()
        result |= {"prior_bpd": torch.cat(priors).double().mean().item(), "decoder_bpd": terms[0]}
        breakdown = Path(cfg.paths.output_dir) / "nll_terms.json"
        breakdown.parent.mkdir(parents=True, exist_ok=True)
        breakdown.write_text(json.dumps({"per_step_bpd": terms, "prior_bpd": result["prior_bpd"]}) + "\n")
        result["terms_file"] = str(breakdown)
    return result


def evaluate_fid(cfg: DictConfig, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """FID/KID (and IS where the extractor has logits) of generated samples against real data."""
    if cfg.images == "samples":
        model.sampler_spec(sampler_of(cfg))  # bad sampler settings fail here, before the reference is computed
    extractor = get_extractor(cfg.extractor, device=device, **cfg.extractor_kwargs)
    datamodule = datamodule_for(cfg, model)
    ref = load_or_compute_reference_stats(
        datamodule.dataset(cfg.reference_split),
        extractor,
        dataset=dataset_key(datamodule),
        split=cfg.reference_split, resolution=model.image_shape[-1], num_images=cfg.reference_images,
        keep_features=True, progress=True,
    )
    if cfg.images == "samples":
        generator = torch.Generator().manual_seed(cfg.seed)
        start = time.perf_counter()
        images, nfe, labels = generate(
            model, cfg.num_samples, cfg.batch_size, generator, sampler_of(cfg), show_progress=True,
            guidance=cfg.get("guidance"), return_labels=True, precision=cfg.precision,
        )
        sampling_s = time.perf_counter() - start
    else:  # real images of a split: the baseline row of a table
        real = datamodule.dataset(cfg.images)
        items = [real[i] for i in range(min(cfg.num_samples, len(real)))]
        images, nfe = torch.stack([image for image, _ in items]), None
        labels = torch.tensor([int(label) for _, label in items]) if model.num_classes else None
    uint8 = to_uint8(images)
    if cfg.save_npz:
        npz = Path(cfg.paths.output_dir) / "samples.npz"
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez(npz, samples=uint8.permute(0, 2, 3, 1).numpy())
    # The training callback's engine: one implementation of FID/KID/IS for both entry points.
    n = len(uint8)
    quality = SampleQuality(
        extractor,
        kid_subset_size=min(cfg.kid_subset_size, n, ref.num_images),
        is_splits=min(10, n),
        batch_size=cfg.batch_size,
    ).to(device)
    quality.set_reference(ref)
    quality.update(uint8, labels)
    result: dict[str, Any] = quality.compute(seed=cfg.seed)
    if nfe is not None:
        result |= {"nfe": nfe, "sampling_ms_per_image": round(1000 * sampling_s / n, 3)}
    result["reference"] = {"split": cfg.reference_split, "num_images": ref.num_images, "extractor": cfg.extractor}
    if not extractor.has_logits:
        result |= {"is": None, "is_unavailable": f"IS unavailable: no logits, {extractor.logits_unavailable_reason}"}
    return result


def sampler_of(cfg: DictConfig) -> dict[str, Any] | None:
    """The sampler the command line chose (``sampler=...``), or None: the checkpoint's own."""
    return OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") else None


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    if cfg.metric not in ("fid", "nll"):
        raise UserError(f"unknown metric {cfg.metric!r}: use metric=fid or metric=nll")
    device = resolve_device(cfg.device)
    model = model_from_checkpoint(cfg.ckpt, ema=cfg.ema).to(device)
    start = time.perf_counter()
    metrics = evaluate_fid(cfg, model, device) if cfg.metric == "fid" else evaluate_nll(cfg, model, device)
    record: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ckpt": str(cfg.ckpt),
        "experiment": model.run_config.get("run_name"),
        "global_step": model.checkpoint_meta["global_step"],
        "ema": bool(cfg.ema),
        "metric": cfg.metric,
        "seed": cfg.seed,
        "device": str(device),
    }
    if cfg.metric == "fid" and cfg.images != "samples":
        record |= {"sampler": f"real-{cfg.images}", "steps": None, "nfe": None, "num_samples": cfg.num_samples}
    elif cfg.metric == "fid":
        spec = model.sampler_spec(sampler_of(cfg))
        record |= {
            "sampler": spec.pop("name"), "steps": spec.pop("steps", None), "sampler_options": spec,
            "guidance": cfg.guidance, "num_samples": cfg.num_samples, "precision": str(cfg.precision),
        }
    record |= metrics
    record["wall_s"] = round(time.perf_counter() - start, 2)
    results = Path(cfg.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=2))
    if "kid" in record:
        print("kid: the raw polynomial-kernel MMD² of the features (papers often print it x1000)")
    print(f"appended to {results}")
    return record


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_or_exit(evaluate, cfg)


if __name__ == "__main__":
    run_entry(main, "evaluate")
