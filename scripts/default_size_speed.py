"""Training images/s of the default model at 28x28 (native) against 32x32 (padded), alternated in one process with
``make bench``'s Lightning measurement (issue 19): ``python scripts/default_size_speed.py [--repeats 3 --steps 40]``."""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from diffusion_lightning import bench

SIZES = {"default28": 28, "default32": 32}


@functools.cache
def model_config(key: str) -> DictConfig:
    with initialize_config_dir(str(Path(bench.__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        return compose("train", overrides=["experiment=ddpm_fmnist", f"data.image_size={SIZES[key]}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    bench.model_config = model_config  # the bench's measurements look the config up by key
    precision = str(model_config("default28").trainer.precision)
    opts = argparse.Namespace(device="cpu", precision=precision, channels_last=False, compile=False)
    runs: dict[str, list[float]] = {k: [] for k in SIZES}
    for _ in range(args.repeats):
        for key in SIZES:
            runs[key].append(bench.lightning_throughput(key, opts, args.batch, args.steps, args.warmup))
            print(key, f"{runs[key][-1]:.1f} img/s", flush=True)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({"precision": precision, "batch": args.batch, "steps": args.steps, "runs": runs,
                      "medians": medians, "time_ratio_28_over_32": medians["default32"] / medians["default28"]}))


if __name__ == "__main__":
    main()
