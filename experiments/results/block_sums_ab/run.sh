#!/bin/bash
# Alternating A/B: before (23dc58a, long-axis reductions) and after (block partial sums),
# every update_cost row at 1 and 2 bits, then the MNIST MLP training step with and without
# diagnostics. Nothing else of ours on the machine.
# Set up: git worktree add /tmp/ab/before 23dc58a; git worktree add /tmp/ab/after 8751ad8
set -e
PART=${1:-all}  # "train_step": only the training-step part
PY=/work/main/.venv/bin/python
OUT=/tmp/ab/out; mkdir -p $OUT
if [ "$PART" = all ]; then
cd /tmp/ab/after && $PY -m experiments.bench.projection_sums --size 2048,4096 > $OUT/projection_sums.txt 2>&1
for run in 1 2; do
  for side in before after; do
    cd /tmp/ab/$side
    $PY -m experiments.bench.update_cost --params both --bits 1,2 --repeats 10 \
      --no-bandwidth --methods 'adam,laq,blaq active,bc,ste' --rounds 0 \
      > $OUT/update_cost_${side}_run$run.txt 2>&1
  done
done
fi
for side in before after; do
  cd /tmp/ab/$side
  $PY -m experiments.bench.train_step --models mlp --repeats 10 --no-diagnostics \
    --methods 'fp,bc,ste,laq,blaq active' --data-dir /work/shared/data > $OUT/train_step_nodiag_$side.txt 2>&1
  $PY -m experiments.bench.train_step --models mlp --repeats 10 \
    --methods 'fp,bc,ste,laq,blaq active' --data-dir /work/shared/data > $OUT/train_step_$side.txt 2>&1
done
echo done > $OUT/DONE
