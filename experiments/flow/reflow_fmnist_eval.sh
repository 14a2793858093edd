#!/usr/bin/env bash
# 2-rectified flow against its 1-rectified teacher at 1 step on Fashion-MNIST (issue 32, must-hold 3): trains
# rf2_fmnist from the given fm_fmnist run (TEACHER=<run folder>; its 5000 pairs from the teacher's Euler sampler at 25
# steps, then 600 steps), then FID (fmnist-classifier, NUM_SAMPLES samples, SEEDS) of both with Euler at 1 and 2 steps.
# Environment: TEACHER (required)  SEEDS="0 1 2"  NUM_SAMPLES=2000  OUT=outputs/fm_eval  PYTHON=.venv/bin/python
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
out=${OUT:-outputs/fm_eval}; mkdir -p "$out"
teacher=${TEACHER:?set TEACHER=<fm_fmnist run folder>}
seeds=$(echo "${SEEDS:-0 1 2}" | tr ' ' ',')
if ! ls -d outputs/train/rf2_fmnist/*/checkpoints/last.ckpt > /dev/null 2>&1; then
  $py -m diffusion_lightning.train experiment=rf2_fmnist "model.teacher.path=$teacher/checkpoints/last.ckpt" \
    callbacks.progress_bar=null +trainer.enable_progress_bar=false > "$out/train_rf2_fmnist.log" 2>&1 \
    || { tail -n 20 "$out/train_rf2_fmnist.log" >&2; exit 1; }
fi
rf2=$(ls -td outputs/train/rf2_fmnist/*/ | head -1 | sed "s:/$::")
$py -m diffusion_lightning.evaluate -m metric=fid extractor=fmnist-classifier "num_samples=${NUM_SAMPLES:-2000}" \
  "results=$out/results.jsonl" "ckpt=$rf2/checkpoints/last.ckpt,$teacher/checkpoints/last.ckpt" sampler=euler \
  sampler.steps=1,2 "seed=$seeds" 2>&1 | grep -E "\"fid\"|Error|error" || true
for s in 1 2; do
  $py -m diffusion_lightning.sample "ckpt=$rf2/checkpoints/last.ckpt" sampler.steps=$s num_samples=64 "out=$out/rf2_${s}step.png" > /dev/null
  $py -m diffusion_lightning.sample "ckpt=$teacher/checkpoints/last.ckpt" sampler.steps=$s num_samples=64 "out=$out/rf1_${s}step.png" > /dev/null
done
