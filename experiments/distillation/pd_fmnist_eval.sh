#!/usr/bin/env bash
# Progressive distillation on Fashion-MNIST against its teacher (issue 16, claim 3), one job at a time on one machine:
#   1. pd_fmnist: 256 -> 1 steps from the newest finished vdiff_fmnist teacher (trained first if there is none);
#   2. FID (fmnist-classifier features, 2,000 samples): the teacher with DDIM and DPM-Solver++(2M) at 256 ... 1 steps
#      and every round's student at its own step count; 3 seeds on the 4- and 1-step rows; sampling ms per image;
#   3. grids: teacher at 256 and 4 steps (DDIM, DPM-Solver++), students at 4 and 1 steps; the table.
# Cheap rows run first, so an interrupted run still has the students and the few-step teacher rows.
# Environment: PD=<pd_fmnist run folder> (evaluate it, no training)  NUM_SAMPLES=2000  PYTHON=.venv/bin/python
#   OUT=outputs/pd_eval  PRECISION=bf16 (the network in sampling; one float32 row measures what it changes)
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
out=${OUT:-outputs/pd_eval}
n=${NUM_SAMPLES:-2000}
mkdir -p "$out"
if [ -z "${PD:-}" ]; then
  $py -m diffusion_lightning.train experiment=pd_fmnist callbacks.progress_bar=null +trainer.enable_progress_bar=false \
    > "$out/train_pd.log" 2>&1 || { tail -n 20 "$out/train_pd.log"; exit 1; }
  grep -E "teacher|run folder" "$out/train_pd.log" || true
fi
pd=${PD:-$(ls -td outputs/train/pd_fmnist/*/ | head -1 | sed "s:/$::")}
teacher=$($py -c "import torch,sys; c=torch.load(sys.argv[1], weights_only=True, map_location='cpu')
m=c['run_config']['model']; print(m['teacher']['path'] if 'teacher' in m else m['teacher_ckpt'])" "$pd/checkpoints/last.ckpt")  # the teacher it was distilled from
echo "pd run: $pd"; echo "teacher: $teacher"
ckpt() { ls "$pd"/checkpoints/step_*-"$1"steps.ckpt; }
students=$(ls "$pd"/checkpoints/step_*steps.ckpt | paste -sd, -)
fid=(metric=fid extractor=fmnist-classifier "num_samples=$n" "results=$out/results.jsonl")
ev() {  # ev ARGS...: one evaluate sweep, in precision P (default PRECISION)
  $py -m diffusion_lightning.evaluate -m "${fid[@]}" "precision=${P:-${PRECISION:-bf16}}" "$@" 2>&1 \
    | grep -E "\"fid\"|Error|error" || true
}

ev "ckpt=$students" seed=0                                              # every round's student, own steps
ev "ckpt=$(ckpt 4),$(ckpt 1)" seed=1,2
ev "ckpt=$teacher" sampler=ddim,dpmpp sampler.steps=1,2,4,8,16 seed=0
ev "ckpt=$teacher" sampler=ddim,dpmpp sampler.steps=4,1 seed=1,2
P=32 ev "ckpt=$teacher" sampler=ddim sampler.steps=16 seed=0                     # what bf16 sampling changes
ev "ckpt=$teacher" sampler=ddim,dpmpp sampler.steps=64,256 seed=0

for s in 4 1; do $py -m diffusion_lightning.sample "ckpt=$(ckpt $s)" num_samples=64 "out=$out/student_${s}steps.png"; done
for s in 256 4; do
  for sampler in ddim dpmpp; do
    $py -m diffusion_lightning.sample "ckpt=$teacher" sampler=$sampler sampler.steps=$s num_samples=64 \
      "out=$out/teacher_${sampler}_${s}steps.png"
  done
done
$py experiments/distillation/pd_fmnist_table.py "$out/results.jsonl" "$pd" | tee "$out/table.md"
