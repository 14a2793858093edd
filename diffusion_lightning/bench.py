"""Benchmark suite: ``python -m diffusion_lightning.bench [--device cpu|cuda] [--out bench/results.json] ...``
(``make bench``).

In one run, with the device, versions and settings beside every figure:

- **training** images/s of each model (``default`` = ``make train``'s ``ddpm_fmnist``, ``cifar`` = the 35.7M
  ``ddpm_cifar`` U-Net of Ho et al.), composed from ``conf/`` with their optimiser, EMA decay and gradient clipping:
  the ``DDPM`` LightningModule under ``Trainer.fit`` with the ``EMA`` callback, a plain PyTorch loop doing the same work
  on the same module (forward, L_simple, backward, grad clip, the configured optimiser, EMA update), and diffusers'
  recipe (``UNet2DModel`` of the same layout and parameter count + ``DDPMScheduler``, its AdamW, clip and ``EMAModel``:
  :mod:`diffusion_lightning.bench_diffusers`). The three are alternated ``--repeats`` times; medians are reported;
- FLOPs per training image (forward and backward, ``torch.utils.flop_counter``), and on a GPU the model FLOP
  utilisation (MFU) against ``--peak-tflops`` and the peak memory per training image;
- **sampling** images/s per sampler and step count;
- the bound (bits/dim) throughput and FID/KID/IS **feature extraction** images/s (on the CPU, where they run).

Speed options: on a GPU bf16-mixed precision, ``torch.compile`` and channels-last (``--precision``, ``--compile``,
``--channels-last`` change them), fp32 eager on the CPU; the fused AdamW of the model config everywhere. The JSON goes
to ``--out`` and a markdown table beside it (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from . import cpu_precision
from .callbacks import EMA
from .callbacks.ema import ema_decay
from .errors import CONF_DIR
from .models import DDPM
from .utils import synchronize

#: model key -> experiment (composed from conf/ as train.py composes it)
#: key -> "<experiment> [override ...]"
MODELS = {"default": "ddpm_fmnist", "cifar": "ddpm_cifar"}
#: the dense bf16 tensor-core peak of an H100/H200 SXM (NVIDIA's datasheet, without sparsity), for MFU
H100_BF16_TFLOPS = 989.4


@functools.cache
def model_config(key: str) -> DictConfig:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        experiment, *overrides = MODELS[key].split()
        return compose("train", overrides=[f"experiment={experiment}", *overrides])


def build_model(key: str, opts: argparse.Namespace) -> DDPM:
    torch.manual_seed(0)
    return instantiate(model_config(key).model, channels_last=opts.channels_last, compile=opts.compile,
                       _convert_="all")


_TRAINED: dict[tuple[str, bool, bool], DDPM] = {}


def trained_model(key: str, opts: argparse.Namespace) -> DDPM:
    """One model per key for all training measurements (Lightning's and the plain loop's), so that ``torch.compile``
    compiles it once, not once per repeat."""
    cache_key = (key, bool(opts.channels_last), bool(opts.compile))
    if cache_key not in _TRAINED:
        _TRAINED[cache_key] = build_model(key, opts)
    return _TRAINED[cache_key]


def _random_images(key: str, n: int) -> torch.Tensor:
    net = model_config(key).model.net
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, net.in_channels, net.image_size, net.image_size, generator=g) * 2 - 1


def _loader(key: str, batch: int, steps: int, device: torch.device) -> DataLoader:
    """``steps`` batches cycled from a pool of 8 random ones (data loading is not what is measured)."""
    pool = TensorDataset(_random_images(key, 8 * batch), torch.zeros(8 * batch).long())
    order = [i % len(pool) for i in range(batch * steps)]
    return DataLoader(pool, batch_size=batch, sampler=order, pin_memory=device.type == "cuda")


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))


class _Timer(L.Callback):
    """Wall time of the training batches after ``warmup`` batches (the device synchronised at both ends)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self.end = time.perf_counter()


def lightning_throughput(key: str, opts: argparse.Namespace, batch: int, steps: int, warmup: int) -> float:
    """Images/s of ``Trainer.fit`` on the DDPM module with the EMA callback, gradient clipping and logging."""
    cfg, model, device = model_config(key), trained_model(key, opts), torch.device(opts.device)
    timer = _Timer(warmup)
    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision=opts.precision, max_steps=steps + warmup,
        gradient_clip_val=cfg.trainer.gradient_clip_val, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[EMA(decay=cfg.callbacks.ema.decay), timer],
    )
    trainer.fit(model, train_dataloaders=_loader(key, batch, steps + warmup, device))
    return batch * steps / (timer.end - timer.start)


def plain_throughput(key: str, opts: argparse.Namespace, batch: int, steps: int, warmup: int,
                     stats: dict[str, Any] | None = None) -> float:
    """Images/s of a hand-written loop doing the same work on the same module; on CUDA ``stats`` receives the peak
    memory."""
    cfg, model, device = model_config(key), trained_model(key, opts), torch.device(opts.device)
    model.to(device)
    clip, decay = cfg.trainer.gradient_clip_val, cfg.callbacks.ema.decay  # read once, off the timed loop
    opt = model.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt.get("lr_scheduler", {}).get("scheduler")
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = 0.0
    for i, (x0, y) in enumerate(_loader(key, batch, steps + warmup, device)):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        x0, y = x0.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, opts.precision):
            loss = model.batch_loss((x0, y))[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - ema_decay(decay, i, True))
    synchronize(device)
    seconds = time.perf_counter() - start
    if stats is not None and device.type == "cuda":
        stats["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return batch * steps / seconds


def _peak_rss_child(key: str, precision: str, batch: int, conn: Any) -> None:
    """In a fresh process: a few plain-loop steps at ``batch``; sends the process's peak resident memory (MiB), read
    from ``VmHWM`` (``getrusage``'s ``ru_maxrss`` would carry over the parent's peak through fork and exec)."""
    opts = argparse.Namespace(device="cpu", precision=precision, compile=False, channels_last=False)
    plain_throughput(key, opts, batch, 2, 1)
    status = Path("/proc/self/status").read_text()
    conn.send(int(status.split("VmHWM:")[1].split()[0]) / 1024)  # kB


def cpu_training_memory(key: str, opts: argparse.Namespace, batch: int) -> dict[str, float]:
    """Peak resident memory of CPU training at ``batch`` and per training image: the slope between ``batch`` and
    ``batch // 4`` (each in a fresh process), which leaves out the interpreter, weights and optimiser state."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    peaks = {}
    for b in (max(1, batch // 4), batch):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_peak_rss_child, args=(key, opts.precision, b, child))
        proc.start()
        peaks[b] = parent.recv()
        proc.join()
    small, large = sorted(peaks)
    return {"peak_memory_mib": round(peaks[large], 1),
            "peak_memory_mib_per_image": round((peaks[large] - peaks[small]) / (large - small), 2)}


def diffusers_throughput(key: str, opts: argparse.Namespace, batch: int, steps: int, warmup: int,
                         precision: str | None = None) -> float:
    """Images/s of diffusers' training recipe on the same layout (:mod:`diffusion_lightning.bench_diffusers`), at
    ``precision`` (default: ours)."""
    from .bench_diffusers import diffusers_train_throughput

    cfg = model_config(key)
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    return diffusers_train_throughput(
        net, batch, steps, warmup, device=opts.device, lr=cfg.model.optimizer.lr, clip=cfg.trainer.gradient_clip_val,
        ema_decay=cfg.callbacks.ema.decay, precision=precision or opts.precision,
        channels_last=bool(opts.channels_last), compile=bool(opts.compile),
    )


def flops_per_image(key: str, batch: int = 2) -> float:
    """FLOPs of one training step's forward and backward per image (``torch.utils.flop_counter``, fp32 eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(key, argparse.Namespace(channels_last=False, compile=False)).train()
    x0 = _random_images(key, batch)
    with FlopCounterMode(display=False) as counter:
        model.batch_loss((x0, None))[0].backward()
    return counter.get_total_flops() / batch


def sampling_throughput(key: str, opts: argparse.Namespace, sampler: str, steps: int, num_samples: int) -> dict:
    """Images/s and network evaluations per image of ``model.sample`` with ``sampler`` at ``steps``, in float32 as
    the ``sample`` and ``evaluate`` entry points run it."""
    device = torch.device(opts.device)
    model = build_model(key, opts).to(device).eval()
    g = torch.Generator().manual_seed(0)
    spec = {"name": sampler, "steps": steps}
    model.sample(2, generator=g, sampler={"name": sampler, "steps": 2})  # warm-up
    synchronize(device)
    start = time.perf_counter()
    _, nfe = model.sample(num_samples, generator=g, sampler=spec, return_nfe=True)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"model": key, "sampler": sampler, "steps": steps, "nfe": nfe, "batch": num_samples,
            "images_per_s": round(num_samples / seconds, 2)}


def nll_throughput(num_images: int, num_strata: int = 20) -> dict[str, Any]:
    """Images/s of the bound (bits/dim) for the default network with the full T-term loop and the stratified
    estimate, and the projected time for a 10k-image test set."""
    from .diffusion.vlb import calc_bpd_loop

    model = build_model("default", argparse.Namespace(channels_last=False, compile=False)).eval()
    g = torch.Generator().manual_seed(0)
    x0 = _random_images("default", num_images)
    T = model.diffusion.num_timesteps
    start = time.perf_counter()
    model.nll(x0, num_strata=num_strata, generator=g)
    strat_ips = num_images / (time.perf_counter() - start)
    small = model.diffusion.respace(range(0, T, max(1, T // 50)))  # time 50 of the T steps, scale to T
    start = time.perf_counter()
    calc_bpd_loop(model.denoiser(), small, x0, model.variance_type, clip_denoised=True, generator=g)
    full_ips = num_images / ((time.perf_counter() - start) * T / small.num_timesteps)
    return {
        "num_images": num_images, "num_timesteps": T, "num_strata": num_strata,
        "stratified_images_per_s": round(strat_ips, 3), "full_images_per_s": round(full_ips, 4),
        "test_10k_stratified_s": round(1e4 / strat_ips), "test_10k_full_s": round(1e4 / full_ips),
    }


def feature_throughput(name: str, batch: int, repeats: int) -> dict[str, Any]:
    """Images/s of extractor ``name`` on random 1x32x32 uint8 batches (best of ``repeats``), or why it was skipped."""
    from .metrics import get_extractor

    kwargs: dict[str, Any] = {"download": False} if name == "inception" else {}
    try:
        extractor = get_extractor(name, **kwargs)
    except FileNotFoundError as e:
        return {"batch": batch, "images_per_s": None, "skipped": str(e)}
    images = torch.randint(0, 256, (batch, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    extractor(images[:2])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        extractor(images)
        times.append(time.perf_counter() - start)
    return {"batch": batch, "repeats": repeats, "images_per_s": round(batch / min(times), 2)}


def _rotations(names: list[str], repeats: int) -> Iterator[str]:
    """Each name ``repeats`` times, the order rotated every round, so drifts in machine load hit all alike."""
    for r in range(repeats):
        k = r % len(names)
        yield from names[k:] + names[:k]


def train_figures(key: str, opts: argparse.Namespace, batch: int) -> dict[str, Any]:
    runners: dict[str, Callable[..., float]] = {
        "lightning": lightning_throughput, "plain": plain_throughput, "diffusers": diffusers_throughput}
    if opts.precision != "32-true":  # also the recipe as its script runs by default (mixed_precision "no")
        runners["diffusers_fp32"] = functools.partial(diffusers_throughput, precision="32")
    if opts.no_diffusers:
        runners.pop("diffusers"), runners.pop("diffusers_fp32", None)
    runs: dict[str, list[float]] = {name: [] for name in runners}
    stats: dict[str, Any] = {}
    for name in _rotations(list(runners), opts.repeats):
        extra = {"stats": stats} if name == "plain" else {}
        runs[name].append(runners[name](key, opts, batch, opts.steps, opts.warmup, **extra))
        print(f"  {key} {name}: {runs[name][-1]:.2f} img/s", flush=True)
    median = {name: statistics.median(values) for name, values in runs.items()}
    flops = flops_per_image(key)
    model = trained_model(key, opts)
    out: dict[str, Any] = {
        "experiment": MODELS[key], "params": sum(p.numel() for p in model.parameters()),
        "batch": batch, "timed_steps": opts.steps, "warmup_steps": opts.warmup,
        "runs": {name: [round(v, 2) for v in values] for name, values in runs.items()},
        "images_per_s": {name: round(v, 2) for name, v in median.items()},
        "lightning_over_plain": round(median["lightning"] / median["plain"], 4),
        "overhead_percent": round(100 * (median["plain"] / median["lightning"] - 1), 2),
        "train_flops_per_image": round(flops),
        # whether torch.compile really ran (False: it fell back to eager, see the log)
        "compiled": model.compiled_network_active,
    }
    if "diffusers" in median:
        out["lightning_over_diffusers"] = round(median["lightning"] / median["diffusers"], 4)
    if "diffusers_fp32" in median:
        out["lightning_over_diffusers_fp32"] = round(median["lightning"] / median["diffusers_fp32"], 4)
    if not opts.device.startswith("cuda"):
        out |= cpu_training_memory(key, opts, batch)
    else:
        peak = opts.peak_tflops * 1e12
        out["mfu"] = {name: round(flops * v / peak, 4) for name, v in median.items()}
        out["peak_tflops"] = opts.peak_tflops
        out["peak_memory_mib"] = round(stats["peak_memory_mib"], 1)
        out["peak_memory_mib_per_image"] = round(stats["peak_memory_mib"] / batch, 2)
    return out


def markdown(result: dict[str, Any]) -> str:
    host, s = result["host"], result["settings"]
    lines = [
        f"# `make bench` on {host['device_name']} ({result['date']})", "",
        f"torch {host['torch']}, lightning {host['lightning']}, diffusers {host['diffusers']}, "
        f"{host['threads']} CPU threads; precision {s['precision']}, compile {s['compile']}, channels-last "
        f"{s['channels_last']}; medians of {s['repeats']} alternated repeats of {s['steps']} timed steps.", "",
        "| model | params | batch | Lightning img/s | plain loop img/s | diffusers img/s (same precision) | "
        "diffusers img/s (fp32, its default) | Lightning/plain | Lightning/diffusers | Lightning/diffusers fp32 | "
        "GFLOP/img (train) | MFU Lightning | peak MiB/img |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, t in result["train"].items():
        ips = t["images_per_s"]
        lines.append(
            f"| {key} ({t['experiment']}) | {t['params'] / 1e6:.2f}M | {t['batch']} | {ips['lightning']} | "
            f"{ips['plain']} | {ips.get('diffusers', '-')} | {ips.get('diffusers_fp32', '-')} | "
            f"{t['lightning_over_plain']} | {t.get('lightning_over_diffusers', '-')} | "
            f"{t.get('lightning_over_diffusers_fp32', '-')} | {t['train_flops_per_image'] / 1e9:.2f} | "
            f"{t.get('mfu', {}).get('lightning', '-')} | {t.get('peak_memory_mib_per_image', '-')} |")
    lines += ["", "| sampling (float32): model | sampler | steps | NFE | batch | img/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['batch']} | {r['images_per_s']} |"
              for r in result["sample"]]
    if result.get("features"):
        lines += ["", "| FID features (CPU) | batch | img/s |", "|---|---|---|"]
        lines += [f"| {name} | {f['batch']} | {f['images_per_s'] if f['images_per_s'] else f.get('skipped', '-')} |"
                  for name, f in result["features"].items()]
    if result.get("nll"):
        n = result["nll"]
        lines += ["", f"Bound (bits/dim), default model: stratified ({n['num_strata']} strata) "
                      f"{n['stratified_images_per_s']} img/s, all {n['num_timesteps']} terms {n['full_images_per_s']} "
                      f"img/s (10k test images: {n['test_10k_stratified_s']} s / {n['test_10k_full_s']} s)."]
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", type=_csv(str), default=None, help="of default,cifar (default: both)")
    parser.add_argument("--batch", type=_csv(int), default=None,
                        help="training batch per model (default: 64,8 on the CPU, 128,128 on a GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 20 CPU, 100 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 CPU, 30 GPU)")
    parser.add_argument("--repeats", type=int, default=3, help="alternated repeats of each training measurement")
    parser.add_argument("--precision", default=None, help="Lightning precision (default: 32-true CPU, bf16-mixed GPU)")
    parser.add_argument("--compile", type=_bool_or_none, default="auto", help="true/false/auto (auto: on a GPU)")
    parser.add_argument("--channels-last", type=_bool_or_none, default="auto", help="true/false/auto (auto: on a GPU)")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers recipe")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="device peak for the MFU")
    parser.add_argument("--samplers", type=_csv(str), default=["ddim", "ddpm", "dpmpp", "heun"])
    parser.add_argument("--sample-steps", type=_csv(int), default=[10, 50])
    parser.add_argument("--sample-models", type=_csv(str), default=None, help="default: default (CPU), both (GPU)")
    parser.add_argument("--sample-batch", type=int, default=None, help="default 64 CPU, 512 GPU")
    parser.add_argument("--classifier-batch", type=int, default=256, help="images for the fmnist-classifier throughput")
    parser.add_argument("--inception-batch", type=int, default=32, help="images for the Inception throughput")
    parser.add_argument("--nll-images", type=int, default=64, help="images for the NLL (bits/dim) throughput (0: skip)")
    opts = parser.parse_args(argv)
    gpu = opts.device.startswith("cuda")
    opts.models = opts.models or list(MODELS)
    opts.batch = opts.batch or [{"default": 64, "cifar": 8}[m] if not gpu else 128 for m in opts.models]
    opts.steps = opts.steps or (100 if gpu else 20)
    opts.warmup = opts.warmup if opts.warmup is not None else (30 if gpu else 3)
    opts.precision = opts.precision or ("bf16-mixed" if gpu else cpu_precision())
    opts.compile = gpu if opts.compile is None else opts.compile
    opts.channels_last = gpu if opts.channels_last is None else opts.channels_last
    opts.sample_models = opts.sample_models or (list(MODELS) if gpu else ["default"])
    opts.sample_batch = opts.sample_batch or (512 if gpu else 64)
    if unknown := sorted(set(opts.models + opts.sample_models) - set(MODELS)):
        parser.error(f"unknown model(s) {unknown}: use {', '.join(MODELS)}")
    if len(opts.batch) != len(opts.models):
        parser.error(f"--batch has {len(opts.batch)} values for {len(opts.models)} models")

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
                     "optimizer": "AdamW (fused, from conf/model)", "repeats": opts.repeats, "steps": opts.steps,
                     "warmup": opts.warmup},
        "train": {},
        "sample": [],
    }
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section, so an interrupted run keeps what it measured
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))

    for key, batch in zip(opts.models, opts.batch, strict=True):
        result["train"][key] = train_figures(key, opts, batch)
        save()
    for key in opts.sample_models:
        for sampler in opts.samplers:
            for steps in opts.sample_steps:
                result["sample"].append(sampling_throughput(key, opts, sampler, steps, opts.sample_batch))
        save()
    if not gpu:
        if opts.nll_images:
            result["nll"] = nll_throughput(opts.nll_images)
        result["features"] = {
            "fmnist-classifier": feature_throughput("fmnist-classifier", opts.classifier_batch, repeats=5),
            "inception": feature_throughput("inception", opts.inception_batch, repeats=1),
        }
    save()
    print(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
