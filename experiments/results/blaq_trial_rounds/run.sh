#!/bin/bash
# BLAQ's trial point in one round, side by side in one process (7aca699).
# Set up: git worktree add /tmp/tr/wt 7aca699
PY=/work/main/.venv/bin/python
OUT=${OUT:-/tmp/tr/out}; mkdir -p $OUT
cd /tmp/tr/wt
for run in 1 2; do
  $PY -m experiments.bench.update_cost --params both --bits 2 --repeats 10 \
    --no-bandwidth --methods 'adam,laq,blaq active' --rounds 0 \
    --out $OUT/update_cost_run$run.json > $OUT/update_cost_run$run.txt 2>&1
done
echo done > $OUT/DONE
