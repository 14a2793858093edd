#!/usr/bin/env bash
# Improved DDPM's main claim on Fashion-MNIST (issue #4, claim 3), end to end on one machine:
#   1. train ddpm_fmnist and iddpm_fmnist for the same number of steps (side by side),
#   2. the full variational bound in bits/dim on the test split (DDPM with fixed_small and fixed_large),
#   3. FID (fmnist-classifier features) and 64-sample grids: iDDPM with 50 respaced steps against DDPM
#      with 1000 steps (and the other two combinations), plus the real-test-image baseline.
# Usage: scripts/fmnist_ddpm_vs_iddpm.sh STEPS NLL_IMAGES FID_SAMPLES [TRAINER]
#   e.g. scripts/fmnist_ddpm_vs_iddpm.sh 20000 10000 10000 gpu   (TRAINER: gpu | cpu)
# Everything lands in outputs/compare/ (runs, grids, results.jsonl, logs).
set -euo pipefail
steps=${1:?STEPS}
nll_images=${2:?NLL_IMAGES}
fid_samples=${3:?FID_SAMPLES}
trainer=${4:-gpu}
py=${PYTHON:-python}
out=${DL_ROOT_DIR:-$PWD}/outputs/compare
mkdir -p "$out/logs" "$out/grids"
results=$out/results.jsonl
ckpt() { echo "$out/$1/checkpoints/last.ckpt"; }
pids=()
wait_all() {  # wait for the background jobs; stop the script if one failed
    local failed=0
    for p in "${pids[@]}"; do wait "$p" || failed=1; done
    pids=()
    [ $failed = 0 ] || { echo "a job failed: see $out/logs/"; exit 1; }
}

run() {  # run NAME CMD...: log the command and its output to logs/NAME.log
    local name=$1
    shift
    local start=$SECONDS
    echo "+ $*" | tee "$out/logs/$name.log"
    "$@" >>"$out/logs/$name.log" 2>&1 || { echo "FAILED: $name"; tail -n 20 "$out/logs/$name.log"; return 1; }
    echo "[$name] done in $((SECONDS - start)) s" | tee -a "$out/logs/$name.log"
}

echo "== train: $steps steps each ($trainer)"
for exp in ddpm_fmnist iddpm_fmnist; do
    run "train_$exp" "$py" -m diffusion_lightning.train experiment=$exp trainer=$trainer \
        trainer.max_steps=$steps \
        callbacks.model_checkpoint.every_n_train_steps=$((steps / 5)) callbacks.progress_bar=null \
        +trainer.enable_progress_bar=false "hydra.run.dir=$out/$exp" &
    pids+=($!)
done
wait_all
tail -n 3 "$out"/logs/train_*.log

echo "== NLL: full bound on $nll_images test images"
nll=(metric=nll "nll.num_images=$nll_images" nll.batch_size=1000 "results=$results")
run nll_ddpm_small "$py" -m diffusion_lightning.evaluate "ckpt=$(ckpt ddpm_fmnist)" "${nll[@]}" \
    nll.variance_type=fixed_small "hydra.run.dir=$out/nll_ddpm_small" &
pids+=($!)
run nll_ddpm_large "$py" -m diffusion_lightning.evaluate "ckpt=$(ckpt ddpm_fmnist)" "${nll[@]}" \
    nll.variance_type=fixed_large "hydra.run.dir=$out/nll_ddpm_large" &
pids+=($!)
run nll_iddpm "$py" -m diffusion_lightning.evaluate "ckpt=$(ckpt iddpm_fmnist)" "${nll[@]}" \
    "hydra.run.dir=$out/nll_iddpm" &
pids+=($!)
wait_all

echo "== FID: $fid_samples samples, fmnist-classifier features, ancestral sampling"
fid=(metric=fid extractor=fmnist-classifier "num_samples=$fid_samples" batch_size=1000 sampler=ddpm "results=$results")
run fid_real "$py" -m diffusion_lightning.evaluate "ckpt=$(ckpt ddpm_fmnist)" "${fid[@]}" images=test \
    "hydra.run.dir=$out/fid_real"
for exp in ddpm_fmnist iddpm_fmnist; do
    for n in 50 1000; do
        run "fid_${exp}_$n" "$py" -m diffusion_lightning.evaluate "ckpt=$(ckpt $exp)" "${fid[@]}" steps=$n \
            "hydra.run.dir=$out/fid_${exp}_$n" &
        pids+=($!)
        run "grid_${exp}_$n" "$py" -m diffusion_lightning.sample "ckpt=$(ckpt $exp)" sampler=ddpm steps=$n \
            num_samples=64 "out=$out/grids/${exp}_ddpm$n.png" "hydra.run.dir=$out/grid_${exp}_$n" &
        pids+=($!)
    done
done
wait_all
echo "== results ($results)"
cat "$results"
