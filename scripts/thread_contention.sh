#!/usr/bin/env bash
# How training throughput holds up when another torch process shares the cores, under OpenMP's default spin-waiting
# and under OMP_WAIT_POLICY=PASSIVE (issue 20). Each cell: the plain loop of `make bench` on the default model
# (batch 64), alone and as two concurrent copies. Usage: bash scripts/thread_contention.sh [STEPS] [ROUNDS]
steps=${1:-20}; rounds=${2:-2}
py=${PY:-.venv/bin/python}
one() {  # print images/s of one plain-loop measurement
  $py -c "
import argparse
from diffusion_lightning import bench
o = argparse.Namespace(device='cpu', precision='32-true', compile=False, channels_last=False)
print(round(bench.plain_throughput('default', o, 64, $steps, 3), 2))"
}
for r in $(seq "$rounds"); do
  for policy in default PASSIVE; do
    if [ $policy = default ]; then unset OMP_WAIT_POLICY; else export OMP_WAIT_POLICY=PASSIVE; fi
    alone=$(one)
    a=$(mktemp); b=$(mktemp)
    one >"$a" & one >"$b"; wait
    echo "round $r policy=$policy alone=$alone pair=$(cat "$a") $(cat "$b")"
    rm -f "$a" "$b"
  done
done
