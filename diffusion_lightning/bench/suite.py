"""Benchmark suite: ``python -m diffusion_lightning.bench [--device cpu|cuda] [--out bench/results.json] ...``
(``make bench``).

In one run, with the device, versions and settings beside every figure:

- **training** of every ``*_fmnist`` recipe and of ``ddpm_cifar`` (the 35.7M U-Net of Ho et al.), each composed from
  ``conf/`` as ``make train`` composes it (a student's teacher and a latent recipe's autoencoder built untrained,
  :mod:`.recipes`): images/s of ``Trainer.fit`` with the run's EMA callback and clipping, of a plain PyTorch loop over
  the same module's ``training_step`` (:mod:`.training`), and, for the DDPM recipes, of diffusers' recipe on the same
  layout (:mod:`.diffusers`); alternated ``--repeats`` times, medians reported. FLOPs per training image (every
  forward and backward of a step, ``torch.utils.flop_counter``), peak memory per image, and on a GPU the model FLOP
  utilisation (MFU) against ``--peak-tflops``;
- the **networks of the CIFAR-10 recipes**: parameters and FLOPs per training image;
- **sampling** images/s of every recipe with its own sampler, and of ``make train``'s model per sampler and steps;
- the **bound** (bits/dim, ``model.nll``) of the pixel recipes that have one, stratified and with all T terms;
- FID/KID/IS **feature extraction** images/s (on the CPU, where they run).

Speed options: on a GPU bf16-mixed precision, ``torch.compile`` and channels-last (``--precision``, ``--compile``,
``--channels-last`` change them), on the CPU its default precision, eager. The JSON goes to ``--out`` and a markdown
table beside it (same name, ``.md``); both are rewritten after every recipe, so an interrupted run keeps what it
measured.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch

from .. import cpu_precision
from ..utils import synchronize
from .recipes import build, cifar_experiments, describe, fmnist_experiments, net_config, rotations, run_config
from .training import cpu_training_memory, flops_per_image, lightning_throughput, plain_throughput, trained_model

#: The default model (``make train``) and the one CIFAR-10 recipe timed in full.
DEFAULT, CIFAR = "ddpm_fmnist", "ddpm_cifar"
#: Recipes that diffusers' ``train_unconditional.py`` also trains (eps-prediction DDPM): timed against it.
DIFFUSERS_RECIPES = ("ddpm_fmnist", "ddpm_cifar")
#: the dense bf16 tensor-core peak of an H100/H200 SXM (NVIDIA's datasheet, without sparsity), for MFU
H100_BF16_TFLOPS = 989.4


def diffusers_throughput(spec: str, opts: argparse.Namespace, batch: int, steps: int, warmup: int,
                         precision: str | None = None) -> float:
    """Images/s of diffusers' training recipe on ``spec``'s U-Net layout, at ``precision`` (default: ours)."""
    from .diffusers import diffusers_train_throughput

    cfg = run_config(spec)
    return diffusers_train_throughput(
        net_config(spec), batch, steps, warmup, device=opts.device, lr=cfg.model.optimizer.lr,
        clip=cfg.trainer.gradient_clip_val, ema_decay=cfg.callbacks.ema.decay, precision=precision or opts.precision,
        channels_last=bool(opts.channels_last), compile=bool(opts.compile),
    )


def train_figures(spec: str, opts: argparse.Namespace, batch: int) -> dict[str, Any]:
    """One recipe's training row: alternated repeats of Lightning, the plain loop and (DDPM) diffusers' recipe."""
    model = trained_model(spec, opts)
    runners: dict[str, Callable[..., float | None]] = {"lightning": lightning_throughput}
    if model.automatic_optimization:
        runners["plain"] = plain_throughput
    if spec in DIFFUSERS_RECIPES and not opts.no_diffusers:
        runners["diffusers"] = diffusers_throughput
        if opts.precision != "32-true":  # also the recipe as its script runs by default (mixed_precision "no")
            runners["diffusers_fp32"] = functools.partial(diffusers_throughput, precision="32")
    runs: dict[str, list[float]] = {name: [] for name in runners}
    stats: dict[str, Any] = {}
    for name in rotations(list(runners), opts.repeats):
        extra = {"stats": stats} if name == "plain" else {}
        runs[name].append(runners[name](spec, opts, batch, opts.steps, opts.warmup, **extra))
        print(f"  {spec} {name}: {runs[name][-1]:.2f} img/s", flush=True)
    median = {name: statistics.median(values) for name, values in runs.items()}
    flops = flops_per_image(spec)
    out: dict[str, Any] = {
        **describe(spec, model), "batch": batch, "timed_steps": opts.steps, "warmup_steps": opts.warmup,
        "runs": {name: [round(v, 2) for v in values] for name, values in runs.items()},
        "images_per_s": {name: round(v, 2) for name, v in median.items()},
        "train_flops_per_image": round(flops),
        "compiled": bool(getattr(model, "compiled_network_active", False)),  # False: torch.compile fell back to eager
    }
    for other in ("plain", "diffusers", "diffusers_fp32"):
        if other in median:
            out[f"lightning_over_{other}"] = round(median["lightning"] / median[other], 4)
    if not opts.device.startswith("cuda"):
        out |= cpu_training_memory(spec, opts, batch)
    else:
        peak = opts.peak_tflops * 1e12
        out["mfu"] = {name: round(flops * v / peak, 4) for name, v in median.items()}
        out["peak_tflops"] = opts.peak_tflops
        if "peak_memory_mib" in stats:
            out["peak_memory_mib"] = round(stats["peak_memory_mib"], 1)
            out["peak_memory_mib_per_image"] = round(stats["peak_memory_mib"] / batch, 2)
    return out


def network_figures(spec: str) -> dict[str, Any]:
    """Parameters and training FLOPs per image of a recipe (not timed): the CIFAR-10 networks on a CPU."""
    return {**describe(spec, build(spec)), "train_flops_per_image": round(flops_per_image(spec, batch=1))}


def sampling_throughput(spec: str, opts: argparse.Namespace, num_samples: int, sampler: str | None = None,
                        steps: int | None = None) -> dict[str, Any] | None:
    """Images/s and network evaluations per image of ``model.sample`` (noise -> sampler -> decode) in float32, as the
    ``sample`` and ``evaluate`` entry points run it: with ``sampler`` at ``steps``, or the recipe's own sampler
    (None: both from its config). None for a recipe that does not sample (the autoencoder)."""
    device = torch.device(opts.device)
    model = build(spec, channels_last=bool(opts.channels_last), compile=bool(opts.compile))
    if not hasattr(model, "sample"):
        return None
    model = model.to(device).eval()
    spec_ = model.sampler_spec({"name": sampler} if sampler else None, **({"steps": steps} if steps else {}))
    g = torch.Generator().manual_seed(0)
    model.sample(2, generator=g, sampler=spec_)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    _, nfe = model.sample(num_samples, generator=g, sampler=spec_, return_nfe=True)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"experiment": spec, "sampler": spec_["name"], "steps": spec_.get("steps"), "nfe": nfe,
            "batch": num_samples, "images_per_s": round(num_samples / seconds, 2)}


def nll_throughput(spec: str, num_images: int, full_images: int, num_strata: int = 20) -> dict[str, Any] | None:
    """Images/s of ``model.nll`` (bits/dim) with the stratified estimate over ``num_images`` and all T terms over
    ``full_images``, and the projected time for a 10k-image test set; None for a recipe with no pixel bound."""
    model = build(spec).eval()
    if not hasattr(model, "nll") or model.first_stage.latent_shape is not None:
        return None
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(max(num_images, full_images), *model.image_shape, generator=g) * 2 - 1
    y = torch.zeros(len(x0), dtype=torch.long) if model.num_classes else None
    start = time.perf_counter()
    model.nll(x0[:num_images], None if y is None else y[:num_images], num_strata=num_strata, generator=g)
    strat_ips = num_images / (time.perf_counter() - start)
    row = {"experiment": spec, "num_timesteps": int(model.hparams["num_timesteps"]), "num_strata": num_strata,
           "num_images": num_images, "stratified_images_per_s": round(strat_ips, 3),
           "test_10k_stratified_s": round(1e4 / strat_ips), "full_images": full_images}  # fmt: skip
    if full_images:
        start = time.perf_counter()
        model.nll(x0[:full_images], None if y is None else y[:full_images], generator=g)
        full_ips = full_images / (time.perf_counter() - start)
        row |= {"full_images_per_s": round(full_ips, 4), "test_10k_full_s": round(1e4 / full_ips)}
    return row


def feature_throughput(name: str, batch: int, repeats: int) -> dict[str, Any]:
    """Images/s of extractor ``name`` on random 1x32x32 uint8 batches (best of ``repeats``), or why it was skipped."""
    from ..metrics import get_extractor

    kwargs: dict[str, Any] = {"download": False} if name == "inception" else {}
    try:
        extractor = get_extractor(name, **kwargs)
    except FileNotFoundError:
        return {"batch": batch, "images_per_s": None, "skipped": "no local weights (make inception-weights)"}
    images = torch.randint(0, 256, (batch, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    extractor(images[:2])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        extractor(images)
        times.append(time.perf_counter() - start)
    return {"batch": batch, "repeats": repeats, "images_per_s": round(batch / min(times), 2)}


def _ratio(t: dict[str, Any], key: str) -> Any:
    return t.get(key, "-")


def markdown(result: dict[str, Any]) -> str:
    host, s = result["host"], result["settings"]
    lines = [
        f"# `make bench` on {host['device_name']} ({result['date']})", "",
        f"torch {host['torch']}, lightning {host['lightning']}, diffusers {host['diffusers']}, "
        f"{host['threads']} CPU threads; precision {s['precision']}, compile {s['compile']}, channels-last "
        f"{s['channels_last']}; medians of {s['repeats']} alternated repeats of {s['steps']} timed steps "
        f"(after {s['warmup']}). Random weights and data: speed only. `python -m diffusion_lightning.bench --help` "
        "says what each figure is.", "",
        "## Training", "",
        "| experiment | recipe | trainable params | frozen params | batch | Lightning img/s | plain loop img/s | "
        "diffusers img/s | Lightning/plain | Lightning/diffusers | Lightning/diffusers fp32 | GFLOP/img (train) | "
        "MFU Lightning | peak MiB | peak MiB/img |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec, t in result["train"].items():
        ips = t["images_per_s"]
        lines.append(
            f"| {spec} | {t['recipe']} | {t['params'] / 1e6:.2f}M | {t['frozen_params'] / 1e6:.2f}M | {t['batch']} | "
            f"{ips['lightning']} | {ips.get('plain', '-')} | {ips.get('diffusers', '-')} | "
            f"{_ratio(t, 'lightning_over_plain')} | {_ratio(t, 'lightning_over_diffusers')} | "
            f"{_ratio(t, 'lightning_over_diffusers_fp32')} | {t['train_flops_per_image'] / 1e9:.2f} | "
            f"{t.get('mfu', {}).get('lightning', '-')} | {t.get('peak_memory_mib', '-')} | "
            f"{t.get('peak_memory_mib_per_image', '-')} |")
    if result.get("networks"):
        lines += ["", "## Networks of the CIFAR-10 recipes (not timed)", "",
                  "| experiment | recipe | trainable params | frozen params | GFLOP/img (train) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {spec} | {n['recipe']} | {n['params'] / 1e6:.2f}M | {n['frozen_params'] / 1e6:.2f}M | "
                  f"{n['train_flops_per_image'] / 1e9:.2f} |" for spec, n in result["networks"].items()]
    lines += ["", "## Sampling (float32, noise -> sampler -> decode)", "",
              "| experiment | sampler | steps | NFE | batch | img/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['experiment']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['batch']} | {r['images_per_s']} |"
              for r in result["sample"]]
    if result.get("nll"):
        lines += ["", "## Bound (bits/dim, `model.nll`)", "",
                  "| experiment | T | stratified img/s | all-T img/s | 10k test images, stratified | 10k, all T |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {n['experiment']} | {n['num_timesteps']} | {n['stratified_images_per_s']} ({n['num_strata']} "
                  f"strata) | {n.get('full_images_per_s', '-')} | {n['test_10k_stratified_s']} s | "
                  f"{n.get('test_10k_full_s', '-')} s |"
                  for n in result["nll"]]
    if result.get("features"):
        lines += ["", "## FID features (CPU)", "", "| extractor | batch | img/s |", "|---|---|---|"]
        lines += [f"| {name} | {f['batch']} | {f['images_per_s'] if f['images_per_s'] else f.get('skipped', '-')} |"
                  for name, f in result["features"].items()]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}, capability {torch.backends.cpu.get_cpu_capability()}"
    return f"CPU: {platform.processor() or platform.machine()}"


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda s: [kind(v) for v in s.split(",") if v]


def _bool_or_none(s: str) -> bool | None:
    return {"true": True, "false": False, "auto": None}[s.lower()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--recipes", type=_csv(str), default=None,
                        help="experiments to train (default: every *_fmnist one and ddpm_cifar); 'none' for none")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 64 CPU, 128 GPU; CIFAR 8 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 10 CPU, 100 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 CPU, 30 GPU)")
    parser.add_argument("--repeats", type=int, default=3, help="alternated repeats of each training measurement")
    parser.add_argument("--precision", default=None, help="Lightning precision (default: the CPU's, bf16-mixed GPU)")
    parser.add_argument("--compile", type=_bool_or_none, default="auto", help="true/false/auto (auto: on a GPU)")
    parser.add_argument("--channels-last", type=_bool_or_none, default="auto", help="true/false/auto (auto: on a GPU)")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers recipe")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="device peak for the MFU")
    parser.add_argument("--networks", type=_csv(str), default=None,
                        help="experiments whose parameters and FLOPs are counted (default: every *_cifar one)")
    parser.add_argument("--samplers", type=_csv(str), default=["ddim", "ddpm", "dpmpp", "heun"],
                        help=f"samplers timed on {DEFAULT}")
    parser.add_argument("--sample-steps", type=_csv(int), default=[10, 50])
    parser.add_argument("--sample-batch", type=int, default=None, help="default 64 CPU, 512 GPU")
    parser.add_argument("--recipe-sample-batch", type=int, default=16, help="batch of every recipe's own sampler")
    parser.add_argument("--classifier-batch", type=int, default=256, help="images for the fmnist-classifier throughput")
    parser.add_argument("--inception-batch", type=int, default=32, help="images for the Inception throughput")
    parser.add_argument("--nll-images", type=int, default=64, help="images of the stratified bound (0: no bound)")
    parser.add_argument("--nll-full-images", type=int, default=1, help="images of the all-T bound (0: none)")
    opts = parser.parse_args(argv)
    gpu = opts.device.startswith("cuda")
    opts.recipes = [] if opts.recipes == ["none"] else opts.recipes or [*fmnist_experiments(), CIFAR]
    opts.networks = [] if opts.networks == ["none"] else (cifar_experiments() if opts.networks is None
                                                          else opts.networks)  # fmt: skip
    known = {*fmnist_experiments(), *cifar_experiments()}
    if unknown := sorted(set(opts.recipes + opts.networks) - known):
        parser.error(f"unknown experiment(s) {unknown}: use {', '.join(sorted(known))}")
    opts.steps = opts.steps or (100 if gpu else 10)
    opts.warmup = opts.warmup if opts.warmup is not None else (30 if gpu else 2)
    opts.precision = opts.precision or ("bf16-mixed" if gpu else cpu_precision())
    opts.compile = gpu if opts.compile is None else opts.compile
    opts.channels_last = gpu if opts.channels_last is None else opts.channels_last
    opts.sample_batch = opts.sample_batch or (512 if gpu else 64)
    return opts


def batch_size(spec: str, opts: argparse.Namespace) -> int:
    if opts.batch:
        return opts.batch
    return 128 if opts.device.startswith("cuda") else 8 if spec.endswith("_cifar") else 64


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse(argv)
    gpu = opts.device.startswith("cuda")
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version, opts.no_diffusers = None, True
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "device": opts.device,
            "device_name": torch.cuda.get_device_name(opts.device) if gpu else _cpu_name(),
            "machine": platform.machine(), "torch": torch.__version__, "lightning": L.__version__,
            "diffusers": diffusers_version, "threads": torch.get_num_threads(), "cuda": torch.version.cuda},
        "settings": {"precision": opts.precision, "compile": opts.compile, "channels_last": opts.channels_last,
                     "repeats": opts.repeats, "steps": opts.steps, "warmup": opts.warmup},
        "train": {}, "networks": {}, "sample": [], "nll": [],
    }
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every recipe, so an interrupted run keeps what it measured
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))

    for spec in opts.recipes:
        print(f"training: {spec}", flush=True)
        result["train"][spec] = train_figures(spec, opts, batch_size(spec, opts))
        save()
    for spec in opts.networks:
        result["networks"][spec] = network_figures(spec)
    save()
    for spec in opts.recipes:
        if not spec.endswith("_cifar") or gpu:
            if row := sampling_throughput(spec, opts, opts.recipe_sample_batch):
                result["sample"].append(row)
    if DEFAULT in opts.recipes:
        for sampler in opts.samplers:
            for steps in opts.sample_steps:
                result["sample"].append(sampling_throughput(DEFAULT, opts, opts.sample_batch, sampler, steps))
    save()
    if not gpu:
        if opts.nll_images:
            result["nll"] = [row for spec in opts.recipes if not spec.endswith("_cifar")
                             if (row := nll_throughput(spec, opts.nll_images, opts.nll_full_images))]  # fmt: skip
        result["features"] = {
            "fmnist-classifier": feature_throughput("fmnist-classifier", opts.classifier_batch, repeats=5),
            "inception": feature_throughput("inception", opts.inception_batch, repeats=1),
        }
    save()
    print(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return result
