#!/usr/bin/env bash
# From a clean worktree of 52fada3, nothing else on the cores.
set -euo pipefail
python -m experiments.bench.update_cost --params both --bits 2 --rounds 1 \
    --methods "adam,laq,ste,blaq active" --repeats 20 \
    --out update_cost.json > update_cost.txt
