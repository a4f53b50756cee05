"""What one round of the k-bit projection costs against a plain sum, on CPU.

A round of :func:`blaq_jax.projection.project` (``tol=None``) evaluates
``beta = nearest_Q(w / alpha)`` and reduces ``S1 = sum(d beta w)`` and
``S2 = sum(d beta^2)`` in one pass over ``(w, d)``. Every row below reads the
same two float32 arrays once (8 bytes per entry), so on a memory-bound
machine they would all take the time of ``one sum``; the ratios show what
the reduction's code costs instead:

* ``one sum``: ``sum(d w)``, one output (XLA:CPU hands it to YNNPACK).
* ``1-bit sums``: the library's 1-bit projection, ``sum((d + e) |w|)`` and
  ``sum(d)`` by :func:`blaq_jax.projection.fused_sums` (one pass).
* ``1-bit, two plain sums``: the same as two ``jnp.sum`` (two passes; the
  library's form before the block partial sums).
* ``fused, no levels``: :func:`blaq_jax.projection.fused_sums` of ``d w`` and
  ``d``: one variadic (two-output) reduction, no level computation.
* ``k-bit round``: the library's round at 2 bits: fused sums of
  ``d |beta| |w|`` and ``d |beta|^2``, ``|beta|`` by one comparison
  (:meth:`blaq_jax.levels.LevelSet.magnitude`), reduced into partial sums of
  16 entries each, then summed.
* ``k-bit round, long reduction``: the same sums reduced along the last axis
  split into ``(C / 16, 16)`` (16 accumulators per row, each a serial chain
  of ``C / 16`` adds; the library's form before the block partial sums).
* ``k-bit round, signed levels``: the same sums as ``d beta w`` and
  ``d beta^2`` with ``beta = nearest(w / alpha)`` (a rounding and a clamp;
  the library's round before it took magnitudes).
* ``k-bit S1 only``: ``sum(d beta w)`` alone, one output (the cost of the
  levels inside a reduction).
* ``k-bit round, two sums``: the same two sums as separate ``jnp.sum`` calls
  (XLA writes the shared ``beta`` to memory first).

Usage::

  python -m experiments.bench.projection_sums --size 2048,4096

Example:
  >>> from experiments.bench.projection_sums import main
  >>> rows = main(["--size", "64,32", "--repeats", "2"])
  ... # doctest: +ELLIPSIS
  machine: ...
  >>> [r["name"] for r in rows][:2]
  ['one sum', '1-bit sums']
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp

from blaq_jax.levels import LevelSet
from blaq_jax.projection import fused_sums
from experiments.bench import common

LEVELS = LevelSet("blaq", 2)


def _round(w, d, alpha):
  beta = LEVELS.nearest(w / alpha)
  db = d * beta
  return db, beta


def _magnitudes(w, d, alpha):
  m = LEVELS.magnitude(jnp.abs(w / alpha))
  dm = d * m
  return [dm * jnp.abs(w), dm * m]


def _long_sums(terms, lanes=16):
  """Sums along the last axis split into (C / lanes, lanes), then the rest."""
  shape = terms[0].shape
  terms = [t.reshape(shape[:-1] + (shape[-1] // lanes, lanes))
           for t in terms]
  rows = jax.lax.reduce(tuple(terms), (jnp.float32(0),) * len(terms),
                        lambda x, y: tuple(a + c for a, c in zip(x, y)),
                        (len(shape) - 1,))
  return [jnp.sum(r) for r in rows]


VARIANTS = {
    "one sum": lambda w, d, a, e: [jnp.sum(d * w)],
    "1-bit sums": lambda w, d, a, e: fused_sums(
        [(d + e) * jnp.maximum(w, -w), d], (0, 1)),
    "1-bit, two plain sums": lambda w, d, a, e: [
        jnp.sum((d + e) * jnp.maximum(w, -w)), jnp.sum(d)],
    "fused, no levels": lambda w, d, a, e: fused_sums([d * w, d], (0, 1)),
    "k-bit round": lambda w, d, a, e: fused_sums(_magnitudes(w, d + e, a),
                                                 (0, 1)),
    "k-bit round, long reduction": lambda w, d, a, e: _long_sums(
        _magnitudes(w, d + e, a)),
    "k-bit round, signed levels": lambda w, d, a, e: (lambda db, b: fused_sums(
        [db * w, db * b], (0, 1)))(*_round(w, d + e, a)),
    "k-bit S1 only": lambda w, d, a, e: (lambda db, b: [jnp.sum(db * w)])(
        *_round(w, d + e, a)),
    "k-bit round, two sums": lambda w, d, a, e: (lambda db, b: [
        jnp.sum(db * w), jnp.sum(db * b)])(*_round(w, d + e, a)),
}


def measure(shape: Sequence[int], repeats: int) -> List[Dict[str, Any]]:
  """Times every variant on one ``shape`` leaf; rows with ms and ratios."""
  key = jax.random.PRNGKey(0)
  w = jax.random.normal(key, shape, jnp.float32)
  d = jnp.abs(jax.random.normal(jax.random.fold_in(key, 1), shape))
  alpha, eps = jnp.float32(0.8), jnp.float32(1e-8)
  runners = {}
  for name, fn in VARIANTS.items():
    compiled = jax.jit(fn).lower(w, d, alpha, eps).compile()
    runners[name] = (lambda c=compiled: c(w, d, alpha, eps))
  samples = common.time_interleaved(runners, repeats=repeats)
  base = common.median(samples["one sum"])
  n = w.size
  return [dict(name=name, ms=1e3 * common.median(s),
               ratio=common.median(s) / base,
               ns_per_entry=1e9 * common.median(s) / n)
          for name, s in samples.items()]


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="2048,4096",
                      help="leaf shape, e.g. 2048,4096")
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args(argv)
  shape = tuple(int(x) for x in args.size.split(","))
  rows = measure(shape, args.repeats)
  print(f"machine: {common.machine()}")
  print(f"\nleaf {shape}, float32 w and d, median of {args.repeats} "
        "interleaved rounds")
  print(common.markdown_table(
      ["variant", "ms", "x one sum", "ns/entry"],
      [[r["name"], r["ms"], r["ratio"], r["ns_per_entry"]] for r in rows]))
  return rows


if __name__ == "__main__":
  main()
