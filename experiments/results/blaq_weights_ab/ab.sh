#!/bin/bash
# BLAQ's active step before (9a1a1ba) and after (0a71dc3) the weights formed
# in each pass: update_cost for Adam, LAQ and BLAQ, before, after, before,
# after, from clean worktrees, nothing else of ours on the machine (AMD EPYC,
# 2 cores). Set up: git worktree add /tmp/rec15b 9a1a1ba; git worktree add
# /tmp/rec15 0a71dc3
set -e
PY=/work/main/.venv/bin/python
OUT=/tmp/s15/ab; mkdir -p $OUT
for run in 1 2; do
  for tree in rec15b:before rec15:after; do
    cd /tmp/${tree%%:*}
    $PY -m experiments.bench.update_cost --params both --bits 1,2 \
        --methods 'adam,laq,blaq active' > $OUT/${tree##*:}_run$run.txt 2>&1
  done
done
echo done > $OUT/DONE
