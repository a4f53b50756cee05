#!/bin/bash
# The update and training-step benchmarks at bca6309 (blocks of 8 for BLAQ's
# projections), from a clean worktree, nothing else of ours on the machine
# (AMD EPYC, 2 cores, CPU). Set up: git worktree add /tmp/rec2 bca6309
set -e
PY=/work/main/.venv/bin/python
OUT=/tmp/s14/out; mkdir -p $OUT
cd /tmp/rec2
$PY -m experiments.bench.sum_block --params both --bits 1,2 --blocks lib,16,8 --repeats 10 > $OUT/sum_block.txt 2>&1
$PY -m experiments.bench.update_cost --params both --bits 1,2 --out $OUT/update_cost.json > $OUT/update_cost.txt 2>&1
$PY -m experiments.bench.train_step --models mlp --no-diagnostics --data-dir /work/shared/data > $OUT/train_step_nodiag.txt 2>&1
$PY -m experiments.bench.train_step --models mlp --data-dir /work/shared/data > $OUT/train_step.txt 2>&1
echo done > $OUT/DONE
