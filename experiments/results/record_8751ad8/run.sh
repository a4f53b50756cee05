#!/bin/bash
# The bench README's main commands at 8751ad8 (block partial sums), one after another, from a
# clean worktree, nothing else of ours on the machine.
# Set up: git worktree add /tmp/rec 8751ad8
set -e
PY=/work/main/.venv/bin/python
OUT=/tmp/rec_out; mkdir -p $OUT
cd /tmp/rec
$PY -m experiments.bench.update_cost --params both --bits 1,2 --out $OUT/update_cost.json > $OUT/update_cost.txt 2>&1
$PY -m experiments.bench.train_step --models mlp --no-diagnostics --data-dir /work/shared/data > $OUT/train_step_nodiag.txt 2>&1
$PY -m experiments.bench.train_step --models mlp --data-dir /work/shared/data > $OUT/train_step.txt 2>&1
echo done > $OUT/DONE
