#!/bin/bash
# The update and training-step benchmarks at 0a71dc3 (BLAQ's active step forms
# its projections' weights inside each pass), from a clean worktree, nothing
# else of ours on the machine (AMD EPYC, 2 cores, CPU).
# Set up: git worktree add /tmp/rec15 0a71dc3
set -e
PY=/work/main/.venv/bin/python
OUT=/tmp/s15/out; mkdir -p $OUT
cd /tmp/rec15
$PY -m experiments.bench.update_cost --params both --bits 1,2 --out $OUT/update_cost.json > $OUT/update_cost.txt 2>&1
$PY -m experiments.bench.train_step --models mlp --no-diagnostics --data-dir /work/shared/data > $OUT/train_step_nodiag.txt 2>&1
echo done > $OUT/DONE
