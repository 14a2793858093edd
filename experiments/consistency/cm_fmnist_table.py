"""The table of experiments/consistency/cm_fmnist_eval.sh: FID (mean +- sd over seeds) per model, sampler and step
count, with each run's training steps and wall time (from its config's write time to its last checkpoint's)."""

from __future__ import annotations

import collections
import json
import statistics
import sys
from pathlib import Path

rows: dict[tuple[str, str, int], list[dict]] = collections.defaultdict(list)
for line in Path(sys.argv[1]).read_text().splitlines():
    r = json.loads(line)
    rows[(r["ckpt"], r["sampler"], int(r["steps"]))].append(r)


def training(ckpt: str) -> str:
    run = Path(ckpt).parent.parent
    wall = Path(ckpt).stat().st_mtime - (run / ".hydra" / "config.yaml").stat().st_mtime
    return f"{wall / 60:.1f} min"


print("| model | experiment | sampler | steps (NFE) | FID (fmnist-classifier, 2k) | seeds | training steps | "
      "training wall time |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
order = {"ect_fmnist": 0, "cd_fmnist": 1, "ict_fmnist": 2, "vdiff_fmnist": 3}
for (ckpt, sampler, steps), rs in sorted(rows.items(), key=lambda kv: (order.get(kv[1][0]["experiment"], 9),
                                                                        kv[0][1], kv[0][2])):  # fmt: skip
    fids = [r["fid"] for r in rs]
    sd = f" ± {statistics.stdev(fids):.2f}" if len(fids) > 1 else ""
    exp = rs[0]["experiment"]
    who = {"ect_fmnist": "ECT", "cd_fmnist": "CD", "ict_fmnist": "iCT (scratch)"}.get(exp, "teacher")
    wall = training(ckpt) if who != "teacher" else "its own run (docs/results/distillation.md)"
    print(f"| {who} | {exp} | {sampler} | {steps} | {statistics.mean(fids):.2f}{sd} | {len(fids)} | "
          f"{rs[0]['global_step']} | {wall} |")
