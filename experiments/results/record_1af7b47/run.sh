#!/bin/bash
# The update and training-step benchmarks at 1af7b47 (library as at 0a09461:
# BLAQ's 1-bit trial point formed in its passes; 2-bit real projection from
# the trial's scale), from a clean worktree, nothing else of ours on the
# machine (AMD EPYC, 2 cores, CPU).
# Set up: git worktree add /tmp/rec18 1af7b47
set -e
PY=/work/main/.venv/bin/python
OUT=/tmp/s18/rec; mkdir -p $OUT
cd /tmp/rec18
$PY -m experiments.bench.update_cost --params both --bits 1,2 --out $OUT/update_cost.json > $OUT/update_cost.txt 2>&1
$PY -m experiments.bench.train_step --models mlp --no-diagnostics --data-dir /work/shared/data > $OUT/train_step_nodiag.txt 2>&1
echo done > $OUT/DONE
