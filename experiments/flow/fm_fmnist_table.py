"""The FID table of experiments/flow/fm_fmnist_eval.sh: ``python experiments/flow/fm_fmnist_table.py RESULTS.jsonl``
prints, per run (its run name), sampler and NFE, the mean ± sd over seeds."""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main() -> None:
    rows: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for line in Path(sys.argv[1]).read_text().splitlines():
        r = json.loads(line)
        name = Path(r["ckpt"]).parents[2].name  # outputs/train/<run name>/<time>/checkpoints/last.ckpt
        rows[(name, r["sampler"], int(r["nfe"]))].append(float(r["fid"]))
    print("| run | sampler | NFE | FID (fmnist-classifier) | seeds |")
    print("| --- | --- | --- | --- | --- |")
    for (name, sampler, nfe), fids in sorted(rows.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        sd = f" ± {statistics.stdev(fids):.2f}" if len(fids) > 1 else ""
        print(f"| {name} | {sampler} | {nfe} | {statistics.mean(fids):.2f}{sd} | {len(fids)} |")


if __name__ == "__main__":
    main()
