#!/usr/bin/env bash
# Consistency models on Fashion-MNIST against their teacher (issue 17, claim 3), one job at a time on one machine:
#   1. train (unless given) ect_fmnist and cd_fmnist from the newest finished vdiff_fmnist run, and ict_fmnist;
#   2. FID (fmnist-classifier features, 2,000 samples, seeds 0-2) of each at 1 and 2 steps, and of the teacher with
#      DDIM and DPM-Solver++(2M) at 1 and 2 steps (the same NFE);
#   3. grids of each model at 1 and 2 steps, and the table (training steps and wall time from the runs).
# Environment: ECT=, CD=, ICT=<run folder> (evaluate it, no training)  NUM_SAMPLES=2000  PYTHON=.venv/bin/python
#   OUT=outputs/cm_eval  PRECISION=32
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
out=${OUT:-outputs/cm_eval}
n=${NUM_SAMPLES:-2000}
mkdir -p "$out"
quiet=(callbacks.progress_bar=null +trainer.enable_progress_bar=false)
run_of() {  # run_of EXP VAR: the given run folder, or a fresh training run of EXP
  if [ -n "${2:-}" ]; then echo "$2"; return; fi
  $py -m diffusion_lightning.train "experiment=$1" "${quiet[@]}" > "$out/train_$1.log" 2>&1 \
    || { tail -n 20 "$out/train_$1.log" >&2; exit 1; }
  ls -td outputs/train/"$1"/*/ | head -1 | sed "s:/$::"
}
ect=$(run_of ect_fmnist "${ECT:-}"); cd=$(run_of cd_fmnist "${CD:-}"); ict=$(run_of ict_fmnist "${ICT:-}")
teacher=$($py -c "import torch,sys; c=torch.load(sys.argv[1], weights_only=True, map_location='cpu')
m=c['run_config']['model']; print(m['teacher']['path'] if 'teacher' in m else m['teacher_ckpt'])" "$ect/checkpoints/last.ckpt")
echo "ect: $ect"; echo "cd: $cd"; echo "ict: $ict"; echo "teacher: $teacher"
fid=(metric=fid extractor=fmnist-classifier "num_samples=$n" "results=$out/results.jsonl" "precision=${PRECISION:-32}")
ev() { $py -m diffusion_lightning.evaluate -m "${fid[@]}" "$@" 2>&1 | grep -E "\"fid\"|Error|error" || true; }

ev "ckpt=$ect/checkpoints/last.ckpt,$cd/checkpoints/last.ckpt,$ict/checkpoints/last.ckpt" sampler=consistency sampler.steps=1,2 seed=0,1,2
ev "ckpt=$teacher" sampler=ddim,dpmpp sampler.steps=1,2 seed=0,1,2

for run in "$ect" "$cd" "$ict"; do
  name=$(basename "$(dirname "$run")")
  for s in 1 2; do
    $py -m diffusion_lightning.sample "ckpt=$run/checkpoints/last.ckpt" sampler=consistency sampler.steps=$s num_samples=64 \
      "out=$out/${name}_${s}step.png" > /dev/null
  done
done
for sampler in ddim dpmpp; do
  $py -m diffusion_lightning.sample "ckpt=$teacher" sampler=$sampler sampler.steps=2 num_samples=64 \
    "out=$out/teacher_${sampler}_2step.png" > /dev/null
done
$py experiments/consistency/cm_fmnist_table.py "$out/results.jsonl" | tee "$out/table.md"
