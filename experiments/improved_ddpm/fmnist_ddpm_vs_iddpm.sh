#!/usr/bin/env bash
# Improved DDPM's main claim on Fashion-MNIST (issue #4, claim 3), end to end on one machine:
#   1. train ddpm_fmnist and iddpm_fmnist for the same number of steps (in resumable chunks if asked),
#   2. the full variational bound in bits/dim on the test split (DDPM with fixed_small and fixed_large),
#   3. FID (fmnist-classifier features) with ancestral sampling at each step count of FID_STEPS: DDPM
#      (beta~) and iDDPM (learned variance), and below T steps also the mechanism rows: DDPM with
#      beta, and the *same* iDDPM network with beta~ and beta instead of its learned variance
#      (iDDPM Sec. 4 / Fig. 8); 64-sample grids of the main rows; the real-test-image baseline.
#
# Usage: experiments/improved_ddpm/fmnist_ddpm_vs_iddpm.sh STEPS NLL_IMAGES FID_SAMPLES [TRAINER]
#   e.g. experiments/improved_ddpm/fmnist_ddpm_vs_iddpm.sh 20000 10000 10000 gpu   (TRAINER: gpu | cpu)
# Environment (all optional):
#   UNTIL=N          train only up to step N in this call, then stop; call again with a larger UNTIL
#                    (the last call with UNTIL=STEPS, or none, also evaluates). Each call continues
#                    from the runs' last.ckpt exactly as one uninterrupted run would (tested), so a
#                    job with a time limit (a 10-minute device command, a SLURM slot) can train in chunks.
#   BATCH=64         data.batch_size of both runs (a tiny net is launch-bound on a GPU: larger batches
#                    cost little time per step)
#   FID_STEPS="50 1000"  sampling step counts of the FID table, e.g. "25 50 100 250 1000"
#   PHASES="train nll fid"  which phases to run
#   JOBS=N           jobs at a time (default 8 on gpu, 1 on cpu: two busy torch processes on 2 cores
#                    slow each other down 2-10x)
#   PYTHON, DL_ROOT_DIR  the interpreter; the folder that holds outputs/compare/
# Everything lands in outputs/compare/ (runs, grids, results.jsonl, logs).
set -euo pipefail
steps=${1:?STEPS}
nll_images=${2:?NLL_IMAGES}
fid_samples=${3:?FID_SAMPLES}
trainer=${4:-gpu}
until_step=${UNTIL:-$steps}
batch=${BATCH:-64}
fid_steps=${FID_STEPS:-50 1000}
phases=" ${PHASES:-train nll fid} "
jobs=${JOBS:-$([ "$trainer" = gpu ] && echo 8 || echo 1)}
py=${PYTHON:-python}
out=${DL_ROOT_DIR:-$PWD}/outputs/compare
mkdir -p "$out/logs" "$out/grids"
results=$out/results.jsonl
[ "$until_step" -le "$steps" ] || { echo "UNTIL=$until_step is past STEPS=$steps"; exit 2; }

ckpt() { echo "$out/$1/checkpoints/last.ckpt"; }
global_step() {  # the optimizer step a checkpoint was written at
    "$py" -c 'import sys, torch; print(torch.load(sys.argv[1], map_location="cpu", weights_only=True)["global_step"])' "$1"
}

run() {  # run NAME CMD...: log the command and its output to logs/NAME.log
    local name=$1
    shift
    local start=$SECONDS
    echo "+ $*" | tee "$out/logs/$name.log"
    "$@" >>"$out/logs/$name.log" 2>&1 || { echo "FAILED: $name"; tail -n 20 "$out/logs/$name.log"; return 1; }
    echo "[$name] done in $((SECONDS - start)) s" | tee -a "$out/logs/$name.log"
}

pids=()
failed=0
spawn() {  # spawn NAME CMD...: run in the background, at most $jobs at a time
    while [ "${#pids[@]}" -ge "$jobs" ]; do
        wait "${pids[0]}" || failed=1
        pids=("${pids[@]:1}")
    done
    run "$@" &
    pids+=($!)
}
wait_all() {  # wait for the background jobs; stop the script if one failed
    for p in "${pids[@]}"; do wait "$p" || failed=1; done
    pids=()
    [ $failed = 0 ] || { echo "a job failed: see $out/logs/"; exit 1; }
}

if [[ $phases == *" train "* ]]; then
    echo "== train: step $until_step of $steps, batch $batch ($trainer)"
    for exp in ddpm_fmnist iddpm_fmnist; do
        resume=()
        if [ -f "$(ckpt $exp)" ]; then
            done_steps=$(global_step "$(ckpt $exp)")
            if [ "$done_steps" -ge "$until_step" ]; then
                echo "[$exp] already at step $done_steps"
                continue
            fi
            echo "[$exp] continuing from step $done_steps"
            resume=("ckpt_path=$(ckpt $exp)")
        fi
        spawn "train_${exp}_$until_step" "$py" -m diffusion_lightning.train experiment=$exp trainer=$trainer \
            trainer.max_steps=$until_step data.batch_size=$batch data.image_size=32 "${resume[@]}" \
            callbacks.model_checkpoint.every_n_train_steps=$(((steps + 4) / 5)) callbacks.progress_bar=null \
            +trainer.enable_progress_bar=false "hydra.run.dir=$out/$exp"
    done
    wait_all
    for exp in ddpm_fmnist iddpm_fmnist; do  # evaluate only what was trained: last.ckpt must be at UNTIL
        at=$(global_step "$(ckpt $exp)")
        [ "$at" -ge "$until_step" ] || { echo "error: $(ckpt $exp) is at step $at, not $until_step"; exit 1; }
    done
    if [ "$until_step" -lt "$steps" ]; then
        echo "trained to step $until_step of $steps: call again with a larger UNTIL (or none) to go on"
        exit 0
    fi
fi

if [[ $phases == *" nll "* ]]; then
    echo "== NLL: full bound on $nll_images test images"
    nll=(metric=nll "nll.num_images=$nll_images" nll.batch_size=1000 "results=$results")
    for variance in fixed_small fixed_large; do
        spawn "nll_ddpm_$variance" "$py" -m diffusion_lightning.evaluate "ckpt=$(ckpt ddpm_fmnist)" "${nll[@]}" \
            nll.variance_type=$variance "hydra.run.dir=$out/nll_ddpm_$variance"
    done
    spawn nll_iddpm "$py" -m diffusion_lightning.evaluate "ckpt=$(ckpt iddpm_fmnist)" "${nll[@]}" \
        "hydra.run.dir=$out/nll_iddpm"
    wait_all
fi

if [[ $phases == *" fid "* ]]; then
    echo "== FID: $fid_samples samples, fmnist-classifier features, ancestral sampling, steps: $fid_steps"
    fid=(metric=fid extractor=fmnist-classifier "num_samples=$fid_samples" batch_size=1000 sampler=ddpm
         "results=$results")
    run fid_real "$py" -m diffusion_lightning.evaluate "ckpt=$(ckpt ddpm_fmnist)" "${fid[@]}" images=test \
        "hydra.run.dir=$out/fid_real"
    for n in $fid_steps; do
        rows=("ddpm_fmnist fixed_small" "iddpm_fmnist learned_range")
        [ "$n" -ge 1000 ] || rows+=("ddpm_fmnist fixed_large" "iddpm_fmnist fixed_small" "iddpm_fmnist fixed_large")
        for row in "${rows[@]}"; do
            read -r exp variance <<<"$row"
            name=${exp}_${n}_$variance
            spawn "fid_$name" "$py" -m diffusion_lightning.evaluate "ckpt=$(ckpt $exp)" "${fid[@]}" \
                sampler.steps=$n "sampler.variance_type=$variance" "hydra.run.dir=$out/fid_$name"
        done
        for exp in ddpm_fmnist iddpm_fmnist; do
            spawn "grid_${exp}_$n" "$py" -m diffusion_lightning.sample "ckpt=$(ckpt $exp)" sampler=ddpm sampler.steps=$n \
                num_samples=64 "out=$out/grids/${exp}_ddpm$n.png" "hydra.run.dir=$out/grid_${exp}_$n"
        done
    done
    wait_all
fi

echo "== results ($results; the latest line of each row)"
[ -f "$results" ] && "$py" - "$results" <<'EOF'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    options = r.get("sampler_options") or r.get("sampler_kwargs") or {}  # sampler_kwargs: records before issue 14
    variance = r.get("variance_type") or options.get("variance_type") or ""
    key = (r["metric"], r.get("experiment", ""), r.get("sampler", ""), r.get("steps") or 0, variance)
    rows[key] = r
for (metric, exp, sampler, steps, variance), r in sorted(rows.items()):
    value = f"{r['bpd']:.3f} +- {r['bpd_stderr']:.3f} bits/dim" if metric == "nll" else f"FID {r['fid']:.2f}"
    where = "" if metric == "nll" else "real images" if sampler == "real-test" else f"{sampler} {steps}"
    print(f"{metric:4} {exp:13} step {r.get('global_step'):<7} {where:12} {variance:14} {value}")
EOF
