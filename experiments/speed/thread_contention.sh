#!/usr/bin/env bash
# How training throughput holds up when another torch process shares the cores (issue 20), under libgomp's own
# spin-wait (GOMP_SPINCOUNT=300000), the package's default (3000, set in diffusion_lightning/__init__.py) and
# OMP_WAIT_POLICY=PASSIVE. Each cell: the plain loop of `make bench` on the default model (batch 64, float32), alone
# and as two concurrent copies. Usage: bash experiments/speed/thread_contention.sh [STEPS] [ROUNDS]
steps=${1:-15}; rounds=${2:-2}
py=${PY:-.venv/bin/python}
one() {  # images/s of one plain-loop measurement
  $py -c "
import argparse
from diffusion_lightning.bench.training import plain_throughput
o = argparse.Namespace(device='cpu', precision='32-true', compile=False, channels_last=False)
print(round(plain_throughput('ddpm_fmnist', o, 64, $steps, 3), 2))"
}
for r in $(seq "$rounds"); do
  for setting in GOMP_SPINCOUNT=300000 GOMP_SPINCOUNT=3000 OMP_WAIT_POLICY=PASSIVE; do
    alone=$(env "$setting" bash -c "$(declare -f one); py=$py; steps=$steps; one")
    a=$(mktemp); b=$(mktemp)
    env "$setting" bash -c "$(declare -f one); py=$py; steps=$steps; one" >"$a" &
    env "$setting" bash -c "$(declare -f one); py=$py; steps=$steps; one" >"$b"; wait
    echo "round $r $setting alone=$alone pair=$(cat "$a") $(cat "$b")"
    rm -f "$a" "$b"
  done
done
