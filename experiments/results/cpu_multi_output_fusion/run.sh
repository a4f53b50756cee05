#!/bin/bash
# Compiled bytes per parameter and kernel counts of the updates with and
# without XLA:CPU's experimental multi-output fusion (a backend extra option,
# off by default in jax 0.10.2). Compile-only: no timing, load-independent.
set -e
cd "$(dirname "$0")/../../.."
OUT=experiments/results/cpu_multi_output_fusion
ARGS="--params both --bits 1,2 --no-timing --rounds 0 --methods"
python -m experiments.bench.update_cost $ARGS "adam,laq,blaq active,bc,ste" > $OUT/default.txt 2>&1
XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion \
  python -m experiments.bench.update_cost $ARGS "adam,laq,blaq active,bc,ste" > $OUT/multi_output_fusion.txt 2>&1
echo done
