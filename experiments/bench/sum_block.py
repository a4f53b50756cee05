"""The block of :func:`blaq_jax.projection.fused_sums`, side by side.

``fused_sums`` splits an axis of a tensor into ``(n / block, block)`` and
reduces the ``block`` entries of each partial sum in one variadic
reduction, into which XLA fuses the terms' producers. The entries of one
partial sum lie ``block`` rows apart, so each input the fused reduction
reads is ``block`` concurrent memory streams, all a multiple of the row
length apart. When the weight of BLAQ's real projection is formed inside
that reduction (``D_bar`` from ``sqrt(v)`` and the trial's ``sqrt(v*)``:
three inputs with ``w``), a block of 16 makes 48 such streams.

Two tables, every variant compiled in one process and timed in interleaved
rounds (:func:`experiments.bench.common.time_interleaved`):

* *leaf*: one projection round's two sums (``d |beta| |w|`` and
  ``d |beta|^2``, ``|beta|`` by one comparison) on one leaf, with ``d``
  read from one array (2 inputs) or blended from two (3 inputs, as BLAQ's
  real projection), per block;
* *update*: each method's whole update (:mod:`experiments.bench.update_cost`'s
  step: donated, carried, warm), compiled once per block, against Adam's;
  ``lib`` keeps the library's choice (blocks of 8 for BLAQ's projections
  on an active step, 16 elsewhere), a number forces that block on every
  sum.

Usage::

  python -m experiments.bench.sum_block --params mlp --bits 1,2 \\
      --blocks lib,16,8

Example:
  >>> import contextlib, io
  >>> from experiments.bench.sum_block import main
  >>> with contextlib.redirect_stdout(io.StringIO()):
  ...   rows = main(["--params", "tiny", "--bits", "1", "--methods", "laq",
  ...                "--blocks", "lib,8", "--repeats", "2", "--leaves",
  ...                "64,32"])
  >>> sorted({(r["table"], str(r["block"])) for r in rows})
  [('leaf', '8'), ('update', '8'), ('update', 'lib')]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from blaq_jax import projection
from blaq_jax.levels import LevelSet
from experiments.bench import common, update_cost

LEVELS = LevelSet("blaq", 2)


@contextlib.contextmanager
def sum_block(block: Optional[int]) -> Iterator[None]:
  """Within the block, every sum of :mod:`blaq_jax.projection` uses
  ``block`` whatever its caller asks (None: the library's own choice); for
  tracing, a compiled step keeps the block it was traced with."""
  original = projection.fused_sums
  if block is not None:
    projection.fused_sums = lambda terms, axes, _=None: original(
        terms, axes, block)
  try:
    yield
  finally:
    projection.fused_sums = original


def _leaf_round(w, d, d2, alpha, inputs, block):
  weight = d if inputs == 2 else 0.6 * d + 0.4 * d2
  m = LEVELS.magnitude(jnp.abs(w) / alpha)
  return projection.fused_sums([weight * m * jnp.abs(w), weight * m * m],
                               tuple(range(w.ndim)), block=block)


def measure_leaf(shape: Sequence[int], blocks: Sequence[int],
                 repeats: int) -> List[Dict[str, Any]]:
  """One round's sums on a ``shape`` leaf, per input count and block
  (numbers only)."""
  blocks = [b for b in blocks if b is not None]
  key = jax.random.PRNGKey(0)
  w = jax.random.normal(key, shape, jnp.float32)
  d, d2 = (jnp.abs(jax.random.normal(jax.random.fold_in(key, i), shape))
           for i in (1, 2))
  alpha = jnp.float32(0.8)
  runners = {}
  for inputs in (2, 3):
    for block in blocks:
      fn = jax.jit(functools.partial(_leaf_round, inputs=inputs, block=block))
      compiled = fn.lower(w, d, d2, alpha).compile()
      runners[(inputs, block)] = lambda c=compiled: c(w, d, d2, alpha)
  samples = common.time_interleaved(runners, repeats=repeats)
  return [dict(table="leaf", shape=list(shape), inputs=inputs, block=block,
               ms=1e3 * common.median(s),
               ratio=common.median(s) / common.median(
                   samples[(inputs, blocks[0])]))
          for (inputs, block), s in samples.items()]


def measure_update(params_name: str, bits_list: Sequence[int],
                   methods: Sequence[str], blocks: Sequence[Optional[int]],
                   repeats: int) -> Tuple[List[Dict[str, Any]], float]:
  """Each method's update compiled per block, timed with Adam's; the rows
  and Adam's ms."""
  params = common.PARAM_SETS[params_name]()
  grads = common.gradient_like(params, seed=1)
  grads2 = common.gradient_like(params, seed=2)
  runners = {}
  factory, kind = update_cost.method_specs(1)["adam"]
  runners["adam"] = update_cost.make_runner(factory(), kind, params, grads,
                                            grads2)[0]
  for bits in bits_list:
    specs = update_cost.method_specs(bits)
    for name in methods:
      factory, kind = specs[name]
      for block in blocks:
        with sum_block(block):
          runner = update_cost.make_runner(factory(), kind, params, grads,
                                           grads2)[0]
        runners[(name, bits, block)] = runner
  samples = common.time_interleaved(runners, repeats=repeats)
  adam = common.median(samples.pop("adam"))
  rows = []
  for (name, bits, block), s in samples.items():
    t = common.median(s)
    rows.append(dict(table="update", params=params_name, method=name,
                     bits=bits, block="lib" if block is None else block,
                     ms=1e3 * t, x_adam=t / adam,
                     ratio=t / common.median(samples[(name, bits,
                                                      blocks[0])])))
  return rows, 1e3 * adam


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--params", default="mlp",
                 choices=["resnet18", "mlp", "both", "tiny"])
  p.add_argument("--bits", default="1,2")
  p.add_argument("--methods", default="laq,blaq active,ste,bc")
  p.add_argument("--blocks", default="lib,16,8",
                 help="blocks to compare (lib: the library's choice); "
                 "ratios are to the first")
  p.add_argument("--leaves", default="2048,2048;784,2048;3,3,512,512",
                 help="leaf shapes of the leaf table, ';'-separated "
                 "(empty: no leaf table)")
  p.add_argument("--repeats", type=int, default=15)
  args = p.parse_args(argv)
  blocks = [None if b == "lib" else int(b) for b in args.blocks.split(",")]
  bits_list = [int(b) for b in args.bits.split(",")]
  methods = args.methods.split(",")
  print(f"machine: {common.machine()}")
  rows = []
  for leaf in filter(None, args.leaves.split(";")):
    shape = tuple(int(x) for x in leaf.split(","))
    r = measure_leaf(shape, blocks, args.repeats)
    print(f"\nleaf {shape}: one round's two sums, median of {args.repeats} "
          f"interleaved rounds; x: time over block {r[0]['block']}'s")
    print(common.markdown_table(
        ["inputs", "block", "ms", "x"],
        [[x["inputs"], x["block"], x["ms"], x["ratio"]] for x in r]))
    rows += r
  names = ["resnet18", "mlp"] if args.params == "both" else [args.params]
  for name in names:
    r, adam_ms = measure_update(name, bits_list, methods, blocks,
                                args.repeats)
    print(f"\n{name}: update, median of {args.repeats} interleaved rounds; "
          f"adam {adam_ms:.3g} ms; x: time over block {r[0]['block']}'s")
    print(common.markdown_table(
        ["method", "bits", "block", "ms", "x adam", "x"],
        [[x["method"], x["bits"], x["block"], x["ms"], x["x_adam"],
          x["ratio"]] for x in r]))
    rows += r
  return rows


if __name__ == "__main__":
  main()
