#!/usr/bin/env bash
# Flow matching against DDPM on Fashion-MNIST at one budget (issue 32, must-hold 3): the default U-Net, data, batch and
# 600 steps of ddpm_fmnist for every model; FID (fmnist-classifier, NUM_SAMPLES samples, SEEDS) at each NFE of NFES:
# FM with logit-normal m in M_VALUES and with uniform t (Euler on a uniform t grid), DDPM-eps with DDIM and
# DPM-Solver++(2M). Two jobs at a time, one thread each (independent runs; no timing is compared).
# Environment: NFES="5 25"  SEEDS="0 1 2"  M_VALUES="0 -0.6 -1.2"  NUM_SAMPLES=2000  OUT=outputs/fm_eval
#   DDPM=<ddpm_fmnist run folder> (evaluate it, no training)  PYTHON=.venv/bin/python
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
out=${OUT:-outputs/fm_eval}; mkdir -p "$out"
n=${NUM_SAMPLES:-2000}; nfes=${NFES:-5 25}; seeds=${SEEDS:-0 1 2}; ms=${M_VALUES:-0 -0.6 -1.2}
export OMP_NUM_THREADS=1
quiet=(callbacks.progress_bar=null +trainer.enable_progress_bar=false)
train_run() {  # train_run NAME OVERRIDES...: trains into outputs/train/NAME/<time>, prints the folder
  local name=$1; shift
  $py -m diffusion_lightning.train "run_name=$name" "${quiet[@]}" "$@" > "$out/train_$name.log" 2>&1 \
    || { tail -n 20 "$out/train_$name.log" >&2; exit 1; }
}
names=(); args=()
for m in $ms; do  # uniform t trains second, beside the first m
  names+=("fm_m$m"); args+=("experiment=fm_fmnist model.logit_mean=$m")
  if [ ${#names[@]} = 1 ]; then names+=(fm_uniform); args+=("experiment=fm_fmnist model.time_density=uniform"); fi
done
[ -z "${DDPM:-}" ] && { names+=(ddpm); args+=("experiment=ddpm_fmnist"); }
for i in "${!names[@]}"; do  # two at a time
  if ! ls -d outputs/train/"${names[$i]}"/*/checkpoints/last.ckpt > /dev/null 2>&1; then
    train_run "${names[$i]}" ${args[$i]} &
    if (( i % 2 == 1 )); then wait; fi
  fi
done
wait
run() { if [ "$1" = ddpm ] && [ -n "${DDPM:-}" ]; then echo "$DDPM"; else ls -td outputs/train/"$1"/*/ | head -1 | sed "s:/$::"; fi; }
csv() { echo "$*" | tr ' ' ','; }
fid=(metric=fid extractor=fmnist-classifier "num_samples=$n" "results=$out/results.jsonl")
ev() { $py -m diffusion_lightning.evaluate -m "${fid[@]}" "$@" 2>&1 | grep -E "\"fid\"|Error|error" || true; }
fm_ckpts=$(for m in $ms; do echo -n "$(run "fm_m$m")/checkpoints/last.ckpt,"; done; echo "$(run fm_uniform)/checkpoints/last.ckpt")
ev "ckpt=$fm_ckpts" sampler=euler "sampler.steps=$(csv $nfes)" "seed=$(csv $seeds)" &
sleep 2  # two multiruns started within one second would share Hydra's sweep folder (named to the second)
ev "ckpt=$(run ddpm)/checkpoints/last.ckpt" sampler=ddim,dpmpp "sampler.steps=$(csv $nfes)" "seed=$(csv $seeds)"
wait
for name in "${names[@]}" ddpm; do
  $py -m diffusion_lightning.sample "ckpt=$(run "$name")/checkpoints/last.ckpt" num_samples=64 "out=$out/$name.png" > /dev/null
done
$py experiments/flow/fm_fmnist_table.py "$out/results.jsonl" | tee "$out/table.md"
