"""Kernels per optimizer step, read from a profiler trace.

Runs each method's step as :mod:`experiments.bench.update_cost` builds it
(``update`` + ``apply_updates``, params and state donated and carried) under
:func:`jax.profiler.trace` and counts, per step, what the device ran:

* on a GPU, every event of the device's streams (``/device:...``
  processes): kernels, and apart from them the copies and memsets; a
  device-to-host copy per step is a host round trip (a ``while_loop``
  predicate goes to the host once per round of a converging projection);
* on a CPU, the thunks XLA:CPU runs whose names are instructions of the
  compiled step (its fusions, reductions, copies and custom calls).

It reports the kernels per step beside the compiled step's count
(:func:`~experiments.bench.update_cost.compiled_profile`: the entry
computation's, without the kernels a ``while`` loop runs each round), their
summed time (on a CPU the threads' times add up) and the longest kernels,
and with ``--out`` writes the rows as JSON and keeps each trace
(``perfetto_trace.json.gz``) under the output folder. The GPU check
(``experiments/bench/gpu_check.sh``) runs it.

Usage::

  python -m experiments.bench.kernel_trace --params mlp --bits 1,2 \\
      --methods "adam,laq,blaq active" --out kernel_trace

Example:
  >>> from experiments.bench.kernel_trace import summarize
  >>> events = [
  ...     {"ph": "M", "pid": 1, "name": "process_name",
  ...      "args": {"name": "/device:GPU:0"}},
  ...     {"ph": "X", "pid": 1, "name": "loop_add_fusion", "dur": 30},
  ...     {"ph": "X", "pid": 1, "name": "MemcpyD2H", "dur": 4},
  ...     {"ph": "X", "pid": 2, "name": "PjitFunction(step)", "dur": 90}]
  >>> s = summarize(events, steps=1, names=set())
  >>> s["where"], s["kernels"], s["copies"], s["device_to_host"]
  ('device', 1.0, 1.0, 1.0)
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import jax

from experiments.bench import common
from experiments.bench import update_cost

_COPY = re.compile(r"memcpy|memset|copy[ _]?(d2h|h2d|dtoh|htod|d2d|dtod)",
                   re.IGNORECASE)
_TO_HOST = re.compile(r"d2h|dtoh|device ?to ?host", re.IGNORECASE)


def hlo_names(compiled) -> set:
  """Instruction names of a compiled module (what XLA:CPU's thunks are
  called in a trace)."""
  return set(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", compiled.as_text(),
                        re.MULTILINE))


def summarize(events: Sequence[Dict[str, Any]], *, steps: int,
              names: set, top: int = 10) -> Dict[str, Any]:
  """Per-step counts of a trace's kernels (see the module docstring).

  ``events``: the trace's ``traceEvents``; ``names``: the compiled step's
  instruction names (used where no device process is traced, i.e. on a
  CPU).
  """
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {p for p, n in procs.items() if n.startswith("/device:")}
  spans = [e for e in events if e.get("ph") == "X"]
  if device:
    spans = [e for e in spans if e.get("pid") in device]
  else:
    spans = [e for e in spans if e.get("name") in names]
  copies = [e for e in spans if _COPY.search(e["name"])]
  kernels = [e for e in spans if not _COPY.search(e["name"])]
  per_name = collections.Counter()
  for e in kernels:
    per_name[e["name"]] += e.get("dur", 0)
  return dict(
      where="device" if device else "host threads",
      kernels=len(kernels) / steps,
      kernel_ms=sum(e.get("dur", 0) for e in kernels) / steps / 1e3,
      copies=len(copies) / steps,
      device_to_host=sum(1 for e in copies if _TO_HOST.search(e["name"]))
      / steps,
      longest=[(n, d / steps / 1e3) for n, d in per_name.most_common(top)])


def trace_steps(runner, steps: int, folder: str) -> str:
  """Traces ``steps`` calls of ``runner`` (warmed up) into ``folder``;
  returns the path of the trace (``perfetto_trace.json.gz``)."""
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    for _ in range(steps):
      out = runner()
    common.block(out)
  found = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"),
                    recursive=True)
  if not found:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {folder}")
  return sorted(found)[-1]


def read_events(path: str) -> List[Dict[str, Any]]:
  """The ``traceEvents`` of a perfetto JSON trace (gzipped)."""
  with gzip.open(path) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def measure(params_name: str, bits_list: Sequence[int],
            methods: Sequence[str], *, steps: int = 5,
            keep: Optional[str] = None) -> List[Dict[str, Any]]:
  """One row per (method, bit width); ``keep``: folder for the traces."""
  params = common.PARAM_SETS[params_name]()
  grads = common.gradient_like(params, seed=1)
  grads2 = common.gradient_like(params, seed=2)
  rows, done = [], set()
  specs_of = {bits: update_cost.method_specs(bits) for bits in bits_list}
  known = set().union(*specs_of.values())
  unknown = [m for m in methods if m not in known]
  if unknown:
    raise ValueError(f"unknown methods {unknown} at bits {list(bits_list)}; "
                     f"rows are {sorted(known)}")
  for bits, specs in specs_of.items():
    for name in (m for m in methods if m in specs):  # e.g. conv: k >= 2
      label = (name, "-" if name == "adam" else bits)
      if label in done:
        continue
      done.add(label)
      factory, kind = specs[name]
      runner, _, profile = update_cost.make_runner(factory(), kind, params,
                                                   grads, grads2)
      for _ in range(3):
        common.block(runner())
      folder = tempfile.mkdtemp(prefix="kernel_trace_")
      try:
        path = trace_steps(runner, steps, folder)
        events = read_events(path)
        if keep:
          slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{params_name} {name} "
                        f"{label[1]}").strip("_")
          os.makedirs(keep, exist_ok=True)
          shutil.copy(path, os.path.join(keep, f"trace_{slug}.json.gz"))
      finally:
        shutil.rmtree(folder, ignore_errors=True)
      names = hlo_names(runner.compiled)
      rows.append(dict(params=params_name, method=name, bits=label[1],
                       steps=steps, compiled_kernels=profile["kernels"],
                       **summarize(events, steps=steps, names=names)))
  return rows


def _parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--params", default="mlp",
                 choices=["resnet18", "mlp", "tiny"])
  p.add_argument("--bits", default="1,2")
  p.add_argument("--methods", default="adam,laq,blaq active",
                 help="comma-separated rows of update_cost, e.g. "
                 "'adam,laq,laq conv,blaq active'")
  p.add_argument("--steps", type=int, default=5, help="traced steps")
  p.add_argument("--out", default="",
                 help="folder for kernel_trace.json and the traces")
  return p


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  args = _parser().parse_args(argv)
  rows = measure(args.params, [int(b) for b in args.bits.split(",") if b],
                 [m for m in args.methods.split(",") if m],
                 steps=args.steps, keep=args.out or None)
  print(f"machine: {common.machine()}")
  print(f"{args.params}: kernels per step, over {args.steps} traced steps")
  print(common.markdown_table(
      ["method", "bits", "where", "kernels", "compiled kernels", "kernel ms",
       "copies", "device-to-host", "longest"],
      [[r["method"], r["bits"], r["where"], r["kernels"],
        r["compiled_kernels"], r["kernel_ms"],
        r["copies"], r["device_to_host"],
        ", ".join(f"{n} {ms:.3g}" for n, ms in r["longest"][:3])]
       for r in rows]))
  if args.out:
    with open(os.path.join(args.out, "kernel_trace.json"), "w") as f:
      json.dump(dict(command="python -m experiments.bench.kernel_trace " +
                     " ".join(argv if argv is not None else sys.argv[1:]),
                     machine=common.machine(), rows=rows), f, indent=1)
  return rows


if __name__ == "__main__":
  main()
