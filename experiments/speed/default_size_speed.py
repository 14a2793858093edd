"""Training images/s of the default model at 28x28 (native) against 32x32 (padded), alternated in one process with
``make bench``'s Lightning measurement (issue 19):
``python experiments/speed/default_size_speed.py [--repeats 3 --steps 40]``."""

from __future__ import annotations

import argparse
import json
import statistics

from diffusion_lightning.bench.recipes import run_config
from diffusion_lightning.bench.training import lightning_throughput

SIZES = {"ddpm_fmnist data.image_size=28": 28, "ddpm_fmnist data.image_size=32": 32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    precision = str(run_config("ddpm_fmnist").trainer.precision)
    opts = argparse.Namespace(device="cpu", precision=precision, channels_last=False, compile=False)
    runs: dict[str, list[float]] = {k: [] for k in SIZES}
    for _ in range(args.repeats):
        for key in SIZES:
            runs[key].append(lightning_throughput(key, opts, args.batch, args.steps, args.warmup))
            print(key, f"{runs[key][-1]:.1f} img/s", flush=True)
    keys = {size: key for key, size in SIZES.items()}
    medians = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({"precision": precision, "batch": args.batch, "steps": args.steps, "runs": runs,
                      "medians": medians, "time_ratio_28_over_32": medians[keys[32]] / medians[keys[28]]}))


if __name__ == "__main__":
    main()
