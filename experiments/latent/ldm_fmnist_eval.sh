#!/usr/bin/env bash
# Latent diffusion against pixel-space DDPM on Fashion-MNIST (issue 15, claim 2), on one machine, one job at a time:
#   1. ldm_fmnist (on the newest finished ae_fmnist run, trained first if none) and ddpm_fmnist made class-conditional
#      the same way (num_classes=10, class_dropout=0.1), both for the same wall time (MAX_TIME);
#   2. FID (fmnist-classifier features, 2,000 samples) and the classifier's accuracy on the samples, 3 seeds: both
#      models unguided (w = 1), and the latent model against the guidance scale w (GUIDANCE);
#   3. grids with one row per class at w = 1 and w = 3.
# Usage: experiments/latent/ldm_fmnist_eval.sh [MAX_TIME]   (default 00:00:05:00; Lightning's DD:HH:MM:SS)
# Environment: GUIDANCE="0,1,2,3,5"  SEEDS="0,1,2"  NUM_SAMPLES=2000  PYTHON=.venv/bin/python  OUT=outputs/ldm_eval
#   LDM=CKPT PIXEL=CKPT: evaluate these checkpoints, no training; STEPS=50: ancestral sampling steps of the FID rows
set -euo pipefail
max_time=${1:-00:00:05:00}
py=${PYTHON:-.venv/bin/python}
out=${OUT:-outputs/ldm_eval}
guidance=${GUIDANCE:-0,1,2,3,5}
seeds=${SEEDS:-0,1,2}
n=${NUM_SAMPLES:-2000}
mkdir -p "$out"
quiet=(callbacks.progress_bar=null +trainer.enable_progress_bar=false)

newest_ckpt() { ls -td "outputs/train/$1"/*/ | head -1 | sed "s:/$::"; }

run() {  # run LOG CMD...: the command's output into LOG; on failure its tail and stop
  local log=$1; shift
  "$@" > "$log" 2>&1 || { tail -n 20 "$log"; exit 1; }
  grep -E "first stage|scale factor|run folder" "$log" || true
}
if [ -z "${LDM:-}" ]; then
  run "$out/train_ldm.log" $py -m diffusion_lightning.train experiment=ldm_fmnist "+trainer.max_time=$max_time" \
      trainer.max_steps=1000000 "${quiet[@]}"
  run "$out/train_pixel.log" $py -m diffusion_lightning.train experiment=ddpm_fmnist run_name=ddpm_fmnist_cond data.image_size=32 \
      model.net.num_classes=10 model.class_dropout=0.1 "+trainer.max_time=$max_time" trainer.max_steps=1000000 \
      "${quiet[@]}"
fi
ldm=${LDM:-$(newest_ckpt ldm_fmnist)/checkpoints/last.ckpt}
pixel=${PIXEL:-$(newest_ckpt ddpm_fmnist_cond)/checkpoints/last.ckpt}
echo "ldm: $ldm"; echo "pixel: $pixel"

fid=(metric=fid extractor=fmnist-classifier "num_samples=$n" "results=$out/results.jsonl" sampler=ddpm
     "sampler.steps=${STEPS:-50}")
$py -m diffusion_lightning.evaluate -m "ckpt=$pixel" "seed=$seeds" "${fid[@]}" 2>&1 | tail -n 3
$py -m diffusion_lightning.evaluate -m "ckpt=$ldm" "seed=$seeds" "guidance=$guidance" "${fid[@]}" 2>&1 | tail -n 3
for w in 1 3; do
  $py -m diffusion_lightning.sample "ckpt=$ldm" guidance=$w num_samples=80 "out=$out/ldm_fmnist_w$w.png"
done
$py -m diffusion_lightning.sample "ckpt=$pixel" num_samples=80 "out=$out/ddpm_fmnist_cond_w1.png"
$py - "$out/results.jsonl" <<'PY'
import collections, json, statistics, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[(r["ckpt"].split("/train/")[-1].split("/")[0], r.get("guidance"))].append(r)
print("| model | w | steps trained | FID (mean ± sd, 3 seeds) | class accuracy |")
print("| --- | --- | --- | --- | --- |")
for (model, w), rs in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] if kv[0][1] is not None else 1)):
    fids = [r["fid"] for r in rs]; acc = [r.get("class_accuracy") for r in rs]
    sd = statistics.stdev(fids) if len(fids) > 1 else 0.0
    print(f"| {model} | {1 if w is None else w} | {rs[0].get('global_step')} | {statistics.mean(fids):.2f} ± {sd:.2f} "
          f"(n={len(fids)}) | {statistics.mean(acc):.3f} |")
PY
