#!/usr/bin/env bash
# The GPU check of issue 15: the optimizer update and the MNIST MLP's
# training step timed against Adam's on a GPU, with the kernels each step
# launches and its host round trips, in one call of under 10 minutes.
#
#   bash experiments/bench/gpu_check.sh [OUTDIR]  # default: $OUT, else
#                                                 # gpu_check_out
#   QUICK=1 bash experiments/bench/gpu_check.sh DIR  # tiny shapes (CPU smoke)
#
# The machine needs jax (with its CUDA plugin), optax, flax and chex, and
# nothing is downloaded. ml_collections (the training step's configs) is
# installed from .whl/ when it is missing and that folder exists; prepare it
# on a machine with the package registry, in the repository's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections
# and carry .whl with the call. MNIST is not needed: the training step runs
# on MNIST-shaped random images (--synthetic).
#
# Writes into OUTDIR (at most 8 files): log.txt (everything printed, with the
# devices and versions), update_cost_{mlp,resnet18}.json (python -m
# experiments.bench.update_cost --params ... --bits 1,2: ratios to Adam,
# bytes and kernels per method, the converging `conv` rows with their
# while_loop), kernel_trace.json (kernels, copies and device-to-host copies
# per step from a profiler trace) and traces.tar.gz (those traces).
# Each part has its own time limit; a part that fails or runs out is noted
# in the log and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
log="$out/log.txt"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

part() {  # part SECONDS DESCRIPTION COMMAND...: run, log, never abort
  local limit=$1 what=$2; shift 2
  echo "=== $what: $*" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $what: rc $rc after $((SECONDS - start)) s" | tee -a "$log"
}

if ! "$py" -c "import ml_collections" 2>/dev/null && [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site \
    .whl/*.whl >>"$log" 2>&1 &&
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
part 40 environment "$py" -c "
import jax, optax, flax
print('jax', jax.__version__, 'optax', optax.__version__, 'flax',
      flax.__version__)
print('devices', jax.devices())"
command -v nvidia-smi >/dev/null && part 20 nvidia-smi nvidia-smi -L

if [ -n "${QUICK:-}" ]; then
  sets=(tiny); uc=(--quick --methods adam,laq --rounds 0)
  kt=(--params tiny --steps 2); ts=(--synthetic --hidden 16,16 --repeats 2)
else
  sets=(mlp resnet18); uc=(--bits 1,2 --no-bandwidth)
  kt=(--params mlp --steps 5); ts=(--synthetic)
fi
# Worst case 40 + 20 + 2 x 160 + 90 + 100 s: under 10 minutes. One
# parameter set per part, so that a slow compile loses one table, not both.
for params in "${sets[@]}"; do
  part 160 "update cost, $params" "$py" -m experiments.bench.update_cost \
    --params "$params" "${uc[@]}" --out "$out/update_cost_$params.json"
done
part 90 "training step" "$py" -m experiments.bench.train_step --models mlp \
  --methods "grad only,fp,laq,blaq active" --no-diagnostics "${ts[@]}"
part 100 "kernels per step" "$py" -m experiments.bench.kernel_trace \
  "${kt[@]}" --bits 1,2 --methods "adam,laq,laq conv,blaq active,bc,ste" \
  --out "$out/kt"

if [ -d "$out/kt" ]; then
  mv "$out/kt/kernel_trace.json" "$out/" 2>/dev/null
  tar -czf "$out/traces.tar.gz" -C "$out/kt" . && rm -rf "$out/kt"
fi
ls -l "$out" | tee -a "$log"
