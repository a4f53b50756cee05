"""Cost of one jitted optimizer update, as a ratio to ``optax.adam``'s.

Each method's step is ``update`` + ``optax.apply_updates`` in one jitted
function whose params and optimizer state are donated and carried from call
to call (updated in place, as in a training loop); the gradient is a fixed
random tree. BLAQ's active step gets ``grad_fn = lambda p: g2 + 0 p`` with
a precomputed second gradient ``g2`` (it reads the trial params, so the
trial projection is not dead code), so the trial gradient's forward and
backward passes are excluded: what is timed is the optimizer's own work.
After a warm-up the methods run in interleaved rounds (see
:func:`experiments.bench.common.time_interleaved`) in one process with Adam,
and the table reports medians and ratios from the same run.

Methods (per bit width): ``laq``, ``blaq active``, ``bc`` (BinaryConnect;
at ``k >= 2`` bits its linear grid of scale 1) and ``ste`` (sign, or the
BLAQ level set with the ``"fit"`` scale), each with the default
``diagnostics=False`` and again with ``+diag`` (``diagnostics=True``). At
``k >= 2`` bits the default projection is 2 fixed rounds; the rows
``... R=r`` set ``tol=None, max_iter=r`` (``--rounds``) and the rows
``... conv`` ask for the converged projection (``tol=1e-6``, a
``while_loop``); ``blaq active trial=1`` projects BLAQ's trial point in one
round (``trial_rounds=1``).

Columns that do not depend on the machine's load come from the compiled
step (:func:`compiled_profile`):

* *HLO B/param*: XLA's cost analysis of the compiled step, bytes accessed
  per parameter (a ``while`` body counts once, whatever its trip count);
* *kernels*: the kernels (fusions, reductions, copies, custom calls) the
  entry computation runs; *loop kernels*: those inside ``while`` bodies, run
  once per round of the k-bit projection;
* *temp B/param*: scratch memory for intermediates written between kernels.

*faults/call* (timed runs): minor page faults per call after the timing,
pages the OS maps (and zeroes) because the last call's freed temporaries
went back to it; :mod:`experiments.heap`, applied when the package is
imported, keeps them (``BLAQ_JAX_MALLOC=default`` measures glibc's
defaults).

*x laq* is the time over LAQ's at the same bit width; *target* and *met*
give issue 15's targets (:data:`TARGETS`: LAQ against Adam, BLAQ's active
step against LAQ), judged only from a timed run.

*pass B/param* is the floor of a single pass: every byte of the step's
inputs (params, gradients, state) read once and every output byte written
once. Timed columns (*ms*, *x adam*, *GB/s*, *% of bw* against a jitted
``a x + y``) are only meaningful on a quiet machine; ``--no-timing`` prints
the compiled profile alone.

Usage::

  python -m experiments.bench.update_cost --params both --bits 1,2
  python -m experiments.bench.update_cost --no-timing  # load-independent
  python -m experiments.bench.update_cost --quick      # small shapes

Example:
  >>> import contextlib, io
  >>> from experiments.bench.update_cost import main
  >>> with contextlib.redirect_stdout(io.StringIO()):  # the printed table
  ...   rows = main(["--quick", "--no-timing", "--bits", "1", "--methods",
  ...                "adam,laq"])
  >>> [(r["method"], r["kernels"] > 0) for r in rows]
  [('adam', True), ('laq', True), ('laq +diag', True)]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

import blaq_jax
from blaq_jax.selection import default_quantize
from experiments.bench import common

LR = 1e-3
DEFAULT_METHODS = ("adam", "laq", "blaq active", "bc", "ste")
# Issue 15's targets on a quiet machine: (method, params, bits) -> (ratio,
# against what). LAQ against Adam; BLAQ's active step against LAQ's update.
TARGETS = {("laq", "resnet18", 1): (2.3, "adam"),
           ("laq", "mlp", 1): (1.8, "adam"),
           ("laq", "resnet18", 2): (2.4, "adam"),
           ("laq", "mlp", 2): (1.9, "adam")}
TARGETS.update({("blaq active", p, b): (2.0, "laq")
                for p in ("resnet18", "mlp") for b in (1, 2)})


def _ste_kwargs(bits: int) -> Dict[str, Any]:
  """STE quantizer at ``bits``: sign, or the BLAQ level set."""
  if bits == 1:
    return dict(quantizer="sign")
  return dict(quantizer="uniform", bits=bits, level_set="blaq")


def method_specs(bits: int, rounds: Optional[int] = None
                 ) -> Dict[str, tuple]:
  """name -> (transform factory, kind of extra arguments) at ``bits``.

  Kinds: ``"none"`` or ``"grad_fn"`` (the trial gradient is the second
  gradient tree). Every quantizing method also appears as ``name +diag``
  (``diagnostics=True``), and at ``bits >= 2`` with ``rounds`` as
  ``name R=rounds`` (``tol=None, max_iter=rounds``) and as ``name conv``
  (``tol=1e-6``: the projection converged, the exact-minimiser option).
  """
  def bc_quantize(path, leaf):
    return bits if default_quantize(path, leaf) else 0

  base = {
      "laq": (lambda **kw: blaq_jax.laq(LR, bits=bits, **kw), "none"),
      "blaq active": (lambda **kw: blaq_jax.blaq(LR, bits=bits, **kw),
                      "grad_fn"),
      "bc": (lambda **kw: blaq_jax.binary_connect(
          LR, quantize=bc_quantize, **kw), "none"),
      "ste": (lambda **kw: blaq_jax.ste(LR, **_ste_kwargs(bits), **kw),
              "none"),
  }
  specs = {"adam": (lambda: optax.adam(LR), "none")}
  for name, (make, kind) in base.items():
    specs[name] = (make, kind)
    specs[f"{name} +diag"] = (
        lambda make=make: make(diagnostics=True), kind)
    if bits >= 2 and name != "bc":  # bc's scale is fixed
      if rounds:
        specs[f"{name} R={rounds}"] = (
            lambda make=make: make(tol=None, max_iter=rounds), kind)
      specs[f"{name} conv"] = (lambda make=make: make(tol=1e-6), kind)
  if bits >= 2:
    specs["blaq active trial=1"] = (
        lambda: base["blaq active"][0](trial_rounds=1), "grad_fn")
  return specs


def _selected(name: str, methods: Optional[Sequence[str]]) -> bool:
  """A method is selected by its name or by its base name (before a space
  and ``+diag``/``R=``/``conv``/``trial=``)."""
  if methods is None:
    methods = DEFAULT_METHODS
  base = re.sub(r" (\+diag|R=\d+|conv|trial=\d+)$", "", name)
  return name in methods or base in methods


def make_step(opt, kind: str):
  """The jitted, donated ``update + apply_updates`` of one method."""
  def step(params, state, grads, grads2):
    # The trial gradient reads the trial params (as a real one does), so
    # XLA cannot drop BLAQ's trial projection as dead code.
    extra = {"grad_fn": lambda p: jax.tree.map(
        lambda g, x: g + 0.0 * x.astype(g.dtype), grads2, p)} if (
            kind == "grad_fn") else {}
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1)), step


def make_runner(opt, kind: str, params, grads, grads2, *, timing=True):
  """A runner doing one donated step (None without timing), the one-pass
  traffic in bytes, and the compiled profile.

  Without ``timing`` nothing is allocated: the step is compiled from
  shapes.
  """
  fn, step = make_step(opt, kind)
  shapes = jax.eval_shape(opt.init, params)
  reads = (common.tree_bytes(params) + common.tree_bytes(shapes)
           + common.tree_bytes(grads)
           + (common.tree_bytes(grads2) if kind == "grad_fn" else 0))
  writes = common.tree_bytes(jax.eval_shape(step, params, shapes, grads,
                                            grads2))
  as_shape = lambda t: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), t)
  compiled = fn.lower(as_shape(params), shapes, as_shape(grads),
                      as_shape(grads2)).compile()
  if not timing:
    return None, reads + writes, compiled_profile(compiled)
  box = {"params": jax.tree.map(jnp.copy, params)}
  # Copies: init may return one buffer at two leaves, and donating a buffer
  # twice is refused.
  box["state"] = jax.tree.map(jnp.copy, opt.init(box["params"]))

  def runner():
    box["params"], box["state"] = compiled(box["params"], box["state"],
                                           grads, grads2)
    return box["params"]

  runner.compiled = compiled
  return runner, reads + writes, compiled_profile(compiled)


# HLO ops that launch no kernel of their own.
_FREE_OPS = frozenset([
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast",
    "while", "conditional", "call", "after-all", "opt-barrier",
    "partition-id", "replica-id"])
_OP = re.compile(r" ([a-z][a-z0-9\-]*)\(")


def _computations(text: str) -> Dict[str, List[str]]:
  """HLO module text -> computation name -> instruction lines ("ENTRY" too)."""
  comps, name = {}, None
  for line in text.splitlines():
    head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head and not line.startswith(" "):
      name = "ENTRY" if head.group(1) else head.group(2)
      comps[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None and " = " in line:
      comps[name].append(line)
  return comps


def _op(line: str) -> str:
  m = _OP.search(line[line.index(" = "):])
  return m.group(1) if m else ""


def compiled_profile(compiled) -> Dict[str, float]:
  """Kernels, bytes accessed and temporaries of a compiled step.

  ``kernels``: instructions of the entry computation that run as kernels
  (fusions, reductions, copies, custom calls...; not parameters, tuples,
  bitcasts or control flow); ``loop_kernels``: the same inside the bodies
  and conditions of its ``while`` loops (run once per iteration);
  ``loops``: the number of ``while`` loops; ``bytes``: XLA's cost-analysis
  bytes accessed; ``temp_bytes``: scratch memory for intermediates.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = jax.jit(lambda x: jnp.sin(x) * 2).lower(jnp.ones(8)).compile()
    >>> p = compiled_profile(c)
    >>> p["kernels"] >= 1, p["loops"], p["bytes"] >= 64
    (True, 0, True)
  """
  comps = _computations(compiled.as_text())
  entry = comps["ENTRY"]
  kernels = sum(1 for line in entry if _op(line) not in _FREE_OPS)
  loops, loop_kernels = 0, 0
  for line in entry:
    if _op(line) != "while":
      continue
    loops += 1
    for key in ("condition", "body"):
      m = re.search(key + r"=%?([\w.\-]+)", line)
      if m and m.group(1) in comps:
        loop_kernels += sum(1 for x in comps[m.group(1)]
                            if _op(x) not in _FREE_OPS)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  mem = compiled.memory_analysis()
  return dict(kernels=kernels, loop_kernels=loop_kernels, loops=loops,
              bytes=float((cost or {}).get("bytes accessed", 0.0)),
              temp_bytes=float(getattr(mem, "temp_size_in_bytes", 0) or 0)
              if mem else 0.0)


def measure(params_name: str, bits_list: Sequence[int], *, repeats: int,
            methods: Optional[Sequence[str]] = None,
            bandwidth: Optional[float] = None, rounds: Optional[int] = 2,
            timing: bool = True) -> List[Dict[str, Any]]:
  """Rows of the table for one parameter set (all bit widths together)."""
  params = common.PARAM_SETS[params_name]()
  grads = common.gradient_like(params, seed=1)
  grads2 = common.gradient_like(params, seed=2)
  n = common.num_params(params)
  runners, traffic, labels, profile = {}, {}, {}, {}
  for bits in bits_list:
    for name, (factory, kind) in method_specs(bits, rounds).items():
      if not _selected(name, methods):
        continue
      key = name if name == "adam" else f"{name} @{bits}"
      if key in runners:
        continue
      runners[key], traffic[key], profile[key] = make_runner(
          factory(), kind, params, grads, grads2, timing=timing)
      labels[key] = (name, "-" if name == "adam" else bits)
  nan = float("nan")
  if timing:
    samples = common.time_interleaved(runners, repeats=repeats, warmup=3)
    base = "adam" if "adam" in samples else next(iter(samples))
    ratio = common.ratios(samples, base)
    faults = {key: common.page_faults(run) for key, run in runners.items()}
  rows = []
  for key in runners:
    t = common.median(samples[key]) if timing else nan
    gbs = traffic[key] / t / 1e9 if timing else nan
    prof = profile[key]
    rows.append(dict(
        params=params_name, method=labels[key][0], bits=labels[key][1],
        ms=t * 1e3, ratio=ratio[key] if timing else nan,
        bytes_per_param=traffic[key] / n,
        hlo_bytes_per_param=prof["bytes"] / n, gbs=gbs,
        frac_bw=(gbs / bandwidth if bandwidth and timing else nan),
        kernels=prof["kernels"], loop_kernels=prof["loop_kernels"],
        loops=prof["loops"], temp_per_param=prof["temp_bytes"] / n,
        faults=faults[key] if timing else nan))
  for row in rows:
    laq = [r["ms"] for r in rows if r["method"] == "laq"
           and r["bits"] == row["bits"]]
    row["x_laq"] = row["ms"] / laq[0] if laq else nan
    goal = TARGETS.get((row["method"], params_name, row["bits"]))
    row["target"], row["met"] = "", ""
    if goal:
      got = row["ratio"] if goal[1] == "adam" else row["x_laq"]
      row["target"] = f"<= {goal[0]}x {goal[1]}"
      row["met"] = "" if not timing else (
          "yes" if got <= goal[0] else f"no (+{100 * (got / goal[0] - 1):.0f}%)")
  return rows


def _parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--params", default="both",
                 choices=["resnet18", "mlp", "both", "tiny"])
  p.add_argument("--bits", default="1,2",
                 help="comma-separated bit widths, e.g. 1,2")
  p.add_argument("--repeats", type=int, default=20,
                 help="interleaved rounds (median over them)")
  p.add_argument("--methods", default=None,
                 help="comma-separated method names (a base name selects "
                 "its +diag and R= rows too); default: "
                 + ",".join(DEFAULT_METHODS))
  p.add_argument("--rounds", type=int, default=2,
                 help="rounds of the fixed-round k-bit projection rows "
                 "(0: no such rows)")
  p.add_argument("--no-bandwidth", action="store_true",
                 help="skip the memory-bandwidth probe")
  p.add_argument("--no-timing", action="store_true",
                 help="compile and profile only (load-independent columns)")
  p.add_argument("--quick", action="store_true",
                 help="tiny shapes, 2 rounds, no bandwidth probe (smoke)")
  p.add_argument("--out", default="",
                 help="also write the rows as JSON to this file")
  return p


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  args = _parser().parse_args(argv)
  if args.quick:
    args.params, args.repeats, args.no_bandwidth = "tiny", 2, True
  timing = not args.no_timing
  bits_list = [int(b) for b in args.bits.split(",") if b]
  names = ["resnet18", "mlp"] if args.params == "both" else [args.params]
  methods = args.methods.split(",") if args.methods else None
  bw = None
  if timing and not args.no_bandwidth:
    probe = common.bandwidth_probe(
        num_elements=2 ** 16 if args.params == "tiny" else 32 * 2 ** 20)
    bw = probe["axpy"]
    print(f"measured bandwidth: axpy {probe['axpy']:.1f} GB/s, "
          f"scale {probe['scale']:.1f} GB/s")
  print(f"machine: {common.machine()}")
  rows = []
  for name in names:
    r = measure(name, bits_list, repeats=args.repeats, methods=methods,
                bandwidth=bw, rounds=args.rounds, timing=timing)
    n = common.num_params(common.PARAM_SETS[name]())
    print(f"\n{name}: {n:,} params" + (
        f", median of {args.repeats} interleaved rounds" if timing else
        ", compiled profile only (no timing)"))
    print(common.markdown_table(
        ["method", "bits", "ms", "x adam", "x laq", "target", "met",
         "pass B/param", "HLO B/param", "GB/s", "% of bw", "kernels",
         "loop kernels", "temp B/param", "faults/call"],
        [[x["method"], x["bits"], x["ms"], x["ratio"], x["x_laq"],
          x["target"], x["met"], x["bytes_per_param"],
          x["hlo_bytes_per_param"], x["gbs"], 100 * x["frac_bw"],
          x["kernels"], x["loop_kernels"], x["temp_per_param"], x["faults"]]
         for x in r]))
    rows += r
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(command="python -m experiments.bench.update_cost " +
                     " ".join(argv if argv is not None else sys.argv[1:]),
                     machine=common.machine(), rows=rows), f, indent=1)
  sys.stdout.flush()
  return rows


if __name__ == "__main__":
  main()
