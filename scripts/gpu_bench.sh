#!/usr/bin/env bash
# The GPU part of `make bench` in one command, for a lent CUDA machine without internet (issue 20):
#   bash scripts/gpu_bench.sh OUT_DIR
# Wheels of what the machine lacks (hydra-core, omegaconf, antlr4, diffusers, torch-fidelity, ...) in .whl/ are
# installed to /tmp/site. Writes OUT_DIR/results_cuda.{json,md} (ddpm_cifar and the default model ddpm_fmnist: Lightning vs plain
# loop vs diffusers with bf16 + compile + channels-last, MFU, peak memory, sampling), OUT_DIR/sync_check.json
# (synchronising CUDA calls inside non-logging training steps) and OUT_DIR/log.txt.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_bench.sh OUT_DIR}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 DIFFUSION_LIGHTNING_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, lightning, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__, 'diffusers', diffusers.__version__)"
echo "== bench $(date -u +%T)"
timeout ${BENCH_TIMEOUT:-400} python3 -m diffusion_lightning.bench --device cuda --out "$out/results_cuda.json" \
  --recipes ddpm_cifar,ddpm_fmnist --networks none --repeats ${REPEATS:-2} --steps ${STEPS:-100} --warmup ${WARMUP:-25} --nll-images 0 \
  ${BENCH_ARGS:-}
echo "bench exit $? $(date -u +%T)"
echo "== sync check (default model, bf16 + compile + channels-last)"
timeout ${SYNC_TIMEOUT:-120} python3 scripts/gpu_sync_check.py ddpm_fmnist --out "$out/sync_check.json"
echo "sync check exit $? $(date -u +%T)"
