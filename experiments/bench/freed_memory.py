"""Freed memory kept or handed back: time, page faults and resident memory.

:mod:`experiments.heap` keeps freed memory in the process, so a step's
temporaries are not faulted in again on every call; the price is a larger
resident set (freed blocks stay, and the heap fragments before it settles).
For each method this runs ``--steps`` donated update steps of
:mod:`experiments.bench.update_cost` in a fresh process, once with the
setting (``kept``) and once with glibc's defaults (``BLAQ_JAX_MALLOC=default``),
and reports over the second half of the steps the median time and the minor
page faults per step, and the resident set at the end and at its peak.

Usage::

  python -m experiments.bench.freed_memory --steps 200

Example:
  >>> import contextlib, io
  >>> from experiments.bench.freed_memory import main
  >>> with contextlib.redirect_stdout(io.StringIO()):
  ...   rows = main(["--params", "tiny", "--steps", "4",
  ...                "--methods", "laq +diag"])
  >>> [(r["method"], r["malloc"]) for r in rows]
  [('laq +diag', 'kept'), ('laq +diag', 'default')]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from experiments import heap
from experiments.bench import common
from experiments.bench import update_cost

METHODS = ("blaq active", "laq +diag", "laq")


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(method: str, params_name: str, steps: int, bits: int
          ) -> Dict[str, Any]:
  """Runs the steps in this process and measures the second half."""
  params = common.PARAM_SETS[params_name]()
  grads = common.gradient_like(params, seed=1)
  grads2 = common.gradient_like(params, seed=2)
  factory, kind = update_cost.method_specs(bits)[method]
  run, _, _ = update_cost.make_runner(factory(), kind, params, grads, grads2)
  times, faults = [], 0
  for i in range(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    common.block(run())
    if i >= steps // 2:
      times.append(time.perf_counter() - t0)
      faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  return dict(ms=1e3 * common.median(times), faults=faults / len(times),
              rss_mb=_rss_mb(),
              max_rss_mb=resource.getrusage(
                  resource.RUSAGE_SELF).ru_maxrss / 1024)


def _parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--params", default="mlp", choices=["resnet18", "mlp", "tiny"])
  p.add_argument("--methods", default=",".join(METHODS),
                 help="comma-separated rows of update_cost, e.g. 'laq +diag'")
  p.add_argument("--bits", type=int, default=1)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  return p


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  args = _parser().parse_args(argv)
  if args.child:
    print(json.dumps(child(args.child, args.params, args.steps, args.bits)))
    return []
  print(f"machine: {common.machine()}")
  rows = []
  for method in [m for m in args.methods.split(",") if m]:
    for malloc in ("kept", "default"):
      env = dict(os.environ)
      env.pop(heap.ENV, None)
      if malloc == "default":
        env[heap.ENV] = "default"
      out = subprocess.run(
          [sys.executable, "-m", "experiments.bench.freed_memory", "--child",
           method, "--params", args.params, "--steps", str(args.steps),
           "--bits", str(args.bits)], env=env, check=True,
          capture_output=True, text=True)
      rows.append(dict(method=method, malloc=malloc,
                       **json.loads(out.stdout.strip().splitlines()[-1])))
  print(f"\n{args.params}, {args.bits} bit(s), {args.steps} steps a process;"
        " time and faults over the second half")
  print(common.markdown_table(
      ["method", "malloc", "ms/step", "faults/step", "RSS MB at end",
       "peak RSS MB"],
      [[r["method"], r["malloc"], r["ms"], r["faults"], r["rss_mb"],
        r["max_rss_mb"]] for r in rows]))
  return rows


if __name__ == "__main__":
  main()
