"""The table of experiments/distillation/pd_fmnist_eval.sh: FID (mean +- sd over seeds), sampling ms per image and,
for the students, the training wall time of their round (from the run's start and its round-end checkpoints' write
times)."""

from __future__ import annotations

import collections
import json
import re
import statistics
import sys
from pathlib import Path

results, run = Path(sys.argv[1]), Path(sys.argv[2])
rows: dict[tuple[str, str, int, str], list[dict]] = collections.defaultdict(list)
for line in results.read_text().splitlines():
    r = json.loads(line)
    who = "student" if "pd_fmnist" in r["ckpt"] else "teacher"
    rows[(who, r["sampler"], int(r["steps"]), r.get("precision", "32"))].append(r)

start = (run / ".hydra" / "config.yaml").stat().st_mtime
ends = sorted((p.stat().st_mtime, int(re.search(r"-(\d+)steps", p.name).group(1)))
              for p in (run / "checkpoints").glob("step_*steps.ckpt"))  # fmt: skip
round_wall = {}
for end, steps in ends:
    round_wall[steps], start = end - start, end

print("| model | sampler | steps | precision | FID (fmnist-classifier) | seeds | sampling ms/image | round wall time |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for (who, sampler, steps, precision), rs in sorted(rows.items(),
                                                   key=lambda kv: (kv[0][0] != "teacher", kv[0][1], -kv[0][2])):
    fids = [r["fid"] for r in rs]
    sd = f" ± {statistics.stdev(fids):.2f}" if len(fids) > 1 else ""
    ms = statistics.median(r["sampling_ms_per_image"] for r in rs)
    wall = f"{round_wall[steps] / 60:.1f} min" if who == "student" and steps in round_wall else ""
    print(f"| {who} | {sampler} | {steps} | {precision} | {statistics.mean(fids):.2f}{sd} | {len(fids)} | {ms:.2f} | "
          f"{wall} |")
