#!/usr/bin/env bash
# Compare `make bench` of two source trees in one run: bash experiments/speed/bench_trees.sh OLD_TREE NEW_TREE [ROUNDS] [OUT]
# Alternates `python -m diffusion_lightning.bench --repeats 1` in OLD_TREE and NEW_TREE (each imports its own
# package: it runs from the tree's root), ROUNDS times (default 3), then prints the median of each figure and the
# new/old ratios. Run it alone: a second busy torch process slows both by 2-10x. Writes OUT/{old,new}_<i>.json.
set -euo pipefail
old=$(realpath "${1:?OLD_TREE}"); new=$(realpath "${2:?NEW_TREE}"); rounds=${3:-3}
out=$(realpath -m "${4:-outputs/bench_trees}")
py=$(realpath -s "${PYTHON:-.venv/bin/python}")  # -s: keep the venv symlink
mkdir -p "$out"
for i in $(seq 1 "$rounds"); do
    for tree in old new; do
        dir=$old; [ $tree = new ] && dir=$new
        echo "round $i: $tree ($dir)"
        (cd "$dir" && "$py" -m diffusion_lightning.bench --repeats 1 --out "$out/${tree}_$i.json" > /dev/null)
    done
done
"$py" - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
figures = {"train lightning img/s": ("train", "lightning_images_per_s"), "train plain img/s": ("train", "plain_images_per_s"),
           "sample DDIM-50 img/s": ("sample", "images_per_s"), "NLL stratified img/s": ("nll", "stratified_images_per_s")}
rows = {t: [json.load(open(f"{out}/{t}_{i}.json")) for i in range(1, rounds + 1)] for t in ("old", "new")}
print(f"{'figure':24} {'old (median)':>14} {'new (median)':>14} {'new/old':>8}   runs old | new")
for name, (a, b) in figures.items():
    vals = {t: [r[a][b] for r in rows[t]] for t in rows}
    mo, mn = statistics.median(vals["old"]), statistics.median(vals["new"])
    print(f"{name:24} {mo:14.2f} {mn:14.2f} {mn / mo:8.3f}   {vals['old']} | {vals['new']}")
PY
