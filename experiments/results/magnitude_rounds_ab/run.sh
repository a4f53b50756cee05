#!/bin/bash
# Alternating A/B: before (ba4c9ff) and after (1fff3f2), MLP and ResNet-18 shapes at 2 bits.
# Set up: git worktree add /tmp/ab/before ba4c9ff; git worktree add /tmp/ab/after 1fff3f2
set -e
PY=/work/main/.venv/bin/python
OUT=/tmp/ab/out; mkdir -p $OUT
cd /tmp/ab/after && $PY -m experiments.bench.projection_sums --size 2048,4096 > $OUT/projection_sums.txt 2>&1
for run in 1 2; do
  for side in before after; do
    cd /tmp/ab/$side
    $PY -m experiments.bench.update_cost --params both --bits 2 --repeats 10 \
      --no-bandwidth --methods 'adam,laq,blaq active,ste' --rounds 0 \
      > $OUT/update_cost_${side}_run$run.txt 2>&1
  done
done
echo done > $OUT/DONE
