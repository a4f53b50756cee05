#!/bin/bash
# The bench README's commands at 464fe14, one after another, from a clean
# worktree, nothing else of ours on the machine (2 cores, CPU).
# Set up: git worktree add /tmp/rec 464fe14
set -e
PY=/work/main/.venv/bin/python
OUT=/tmp/s12/rec_out; mkdir -p $OUT
cd /tmp/rec
$PY -m experiments.bench.memory --params both --bits 1,2 > $OUT/memory.txt 2>&1
$PY -m experiments.bench.train_step --models mlp,lenet5,resnet18 --batch resnet18=16 --repeats 10 --no-diagnostics --data-dir /work/shared/data > $OUT/train_step_nodiag.txt 2>&1
$PY -m experiments.bench.scaling --model mlp --per-device-batch 32 --data-dir /work/shared/data > $OUT/scaling.txt 2>&1
$PY -m experiments.bench.train_step --models mlp,lenet5,resnet18 --batch resnet18=16 --repeats 10 --data-dir /work/shared/data > $OUT/train_step.txt 2>&1
$PY -m experiments.bench.update_cost --params both --bits 1,2 --out $OUT/update_cost.json > $OUT/update_cost.txt 2>&1
echo done > $OUT/DONE
