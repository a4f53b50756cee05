#!/bin/bash
# One-pass and better-started projections at 2 bits: prototypes, not library
# code (see NOTE.md). Run from the repository root, nothing else of ours on
# the machine; the timing first.
set -e
D=experiments/results/one_pass_projection
export PYTHONPATH=$PWD
PY=${PY:-.venv/bin/python}
$PY $D/grid_timing.py > $D/grid_timing.txt 2>&1
$PY $D/grid_error.py --bits 2 --out '' > $D/grid_error.txt 2>&1
$PY $D/blaq_real_start.py --bits 2 --out '' > $D/blaq_real_start.txt 2>&1
$PY $D/blaq_real_start.py --bits 2 --level-set linear --out '' > $D/blaq_real_start_linear.txt 2>&1
echo done
