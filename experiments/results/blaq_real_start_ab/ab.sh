#!/bin/bash
# BLAQ's 2-bit active step before (72ab375: the real projection in 2 rounds
# from the last scale) and after (7850be1: 1 round from the trial's scale):
# update_cost for Adam, LAQ and BLAQ at 2 bits, before, after, before, after,
# from clean worktrees, nothing else of ours on the machine (AMD EPYC, 2
# cores). Set up: git worktree add /tmp/ab_before 72ab375; git worktree add
# /tmp/ab_after 7850be1
set -e
PY=/work/main/.venv/bin/python
OUT=/work/main/experiments/results/blaq_real_start_ab
for run in 1 2; do
  for side in before after; do
    cd /tmp/ab_$side
    $PY -m experiments.bench.update_cost --params both --bits 2 --rounds 0 \
        --methods 'adam,laq,blaq active' > $OUT/${side}_run$run.txt 2>&1
  done
done
echo done
