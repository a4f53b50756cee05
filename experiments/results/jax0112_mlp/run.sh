#!/bin/bash
# The MLP's update cost under jax 0.11.2 (Python 3.12) and jax 0.10.2 (Python 3.11), one after the other,
# from a clean worktree of 418b38b, nothing else of ours on the machine.
# Set up: git worktree add /tmp/s9/wt 418b38b; /root/.pyenv/versions/3.12.1/bin/python -m venv /tmp/s9/v312;
#         /tmp/s9/v312/bin/pip install -e '/tmp/s9/wt[test]' jax==0.11.2 jaxlib==0.11.2
set -e
cd /tmp/s9/wt
OUT=/tmp/s9/uc; mkdir -p $OUT
M='adam,laq,blaq active,bc,ste'
/tmp/s9/v312/bin/python -m experiments.bench.update_cost --params mlp --bits 1,2 --methods "$M" \
    --out $OUT/update_cost_jax0112.json > $OUT/update_cost_jax0112.txt 2>&1
/work/main/.venv/bin/python -m experiments.bench.update_cost --params mlp --bits 1,2 --methods "$M" \
    --out $OUT/update_cost_jax0102.json > $OUT/update_cost_jax0102.txt 2>&1
