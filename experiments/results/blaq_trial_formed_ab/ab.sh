#!/bin/bash
# BLAQ's 1-bit active step before (492900b: the trial point w* written by a
# pass of its own, then read by the trial's sums and the trial-params pass)
# and after (0a09461: both passes form w* from w_t, g and the moments):
# update_cost for Adam, LAQ and BLAQ at 1 bit, before, after, three times,
# from clean worktrees, nothing else of ours on the machine (AMD EPYC, 2
# cores). Set up: git worktree add /tmp/ab_before 492900b; git worktree add
# /tmp/ab_after 0a09461
set -e
PY=/work/main/.venv/bin/python
OUT=/work/main/experiments/results/blaq_trial_formed_ab
for run in 1 2 3; do
  for side in before after; do
    cd /tmp/ab_$side
    $PY -m experiments.bench.update_cost --params both --bits 1 --rounds 0 \
        --methods 'adam,laq,blaq active' > $OUT/${side}_run$run.txt 2>&1
  done
done
echo done
