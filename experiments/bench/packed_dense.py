"""1-bit dense layer from packed weights vs the float matmul: time and memory.

Three ways to compute one ``n_in x n_out`` layer (default 2048 x 2048, the
MNIST MLP's hidden layer) on a batch:

* ``float``: ``x @ W`` with ``W`` resident as float32 (what training keeps).
* ``unpack``: :func:`blaq_jax.packed_dense.unpack_dense`, the packed codes
  resident and ``W`` decoded inside the jitted call.
* ``xnor``: :func:`blaq_jax.packed_dense.xnor_dense` on binarized inputs
  (XOR + popcount), weights pre-laid out as uint32 words; ``xnor+pack``
  includes binarizing and packing the inputs.

*resident B* is the weight memory held between calls; *temp B* is XLA's
temporary buffer size of the compiled call (``memory_analysis``). Times are
medians of interleaved rounds (:mod:`experiments.bench.common`).

Usage::

  python -m experiments.bench.packed_dense --batch 1,128 --size 2048,2048

Example:
  >>> from experiments.bench.packed_dense import main
  >>> rows = main(["--batch", "2", "--size", "64,32", "--repeats", "2"])
  ... # doctest: +ELLIPSIS
  |...
  >>> sorted({r["method"] for r in rows})
  ['float', 'unpack', 'xnor', 'xnor+pack']
"""

from __future__ import annotations

import argparse
import functools
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blaq_jax.levels import LevelSet
from blaq_jax.packed_dense import (pack_signs, reference_dense, unpack_dense,
                                   xnor_dense, xnor_weights)
from blaq_jax.packing import pack_bits
from experiments.bench import common


def _temp_bytes(fn, *args) -> Optional[int]:
  try:
    return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  (backend-dependent API)
    return None


def bench(batch: int, n_in: int, n_out: int, repeats: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 2, (n_in, n_out)).astype(np.uint8)
  alpha = np.float32(0.05)
  ls = LevelSet("blaq", 1)
  w = np.asarray(jnp.asarray(alpha) * ls.decode(codes))
  x = rng.standard_normal((batch, n_in)).astype(np.float32)
  packed = jnp.asarray(pack_bits(codes, 1))
  w_words = jax.jit(xnor_weights, static_argnums=1)(packed, (n_in, n_out))
  xs = jnp.asarray(x)
  wf = jnp.asarray(w)

  f_float = jax.jit(reference_dense)
  f_unpack = jax.jit(functools.partial(unpack_dense, level_set=ls,
                                       shape=(n_in, n_out)))
  f_xnor = jax.jit(functools.partial(xnor_dense, n_in=n_in))
  f_xnor_pack = jax.jit(lambda x, ww, a: xnor_dense(pack_signs(x), ww, n_in,
                                                     a))
  x_words = jax.jit(pack_signs)(xs)

  # Correctness before timing.
  ref = np.asarray(f_float(xs, wf))
  np.testing.assert_allclose(np.asarray(f_unpack(xs, packed, alpha)), ref,
                             rtol=1e-4, atol=1e-4)
  sign_ref = np.asarray(f_float(jnp.where(xs >= 0, 1.0, -1.0), wf))
  np.testing.assert_allclose(np.asarray(f_xnor(x_words, w_words, alpha=alpha)),
                             sign_ref, rtol=1e-5, atol=1e-5)

  runners = {
      "float": lambda: f_float(xs, wf),
      "unpack": lambda: f_unpack(xs, packed, alpha),
      "xnor": lambda: f_xnor(x_words, w_words, alpha=alpha),
      "xnor+pack": lambda: f_xnor_pack(xs, w_words, alpha),
  }
  resident = {"float": wf.nbytes, "unpack": packed.nbytes,
              "xnor": w_words.nbytes, "xnor+pack": w_words.nbytes}
  temp = {"float": _temp_bytes(f_float, xs, wf),
          "unpack": _temp_bytes(f_unpack, xs, packed, alpha),
          "xnor": _temp_bytes(jax.jit(lambda a, b, c: xnor_dense(a, b, n_in,
                                                                  c)),
                              x_words, w_words, alpha),
          "xnor+pack": _temp_bytes(f_xnor_pack, xs, w_words, alpha)}
  samples = common.time_interleaved(runners, repeats=repeats)
  ratio = common.ratios(samples, "float")
  return [dict(batch=batch, n_in=n_in, n_out=n_out, method=name,
               ms=1e3 * common.median(samples[name]), vs_float=ratio[name],
               resident_bytes=resident[name], temp_bytes=temp[name])
          for name in runners]


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", default="1,128",
                      help="comma-separated batch sizes")
  parser.add_argument("--size", default="2048,2048", help="n_in,n_out")
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  n_in, n_out = (int(s) for s in args.size.split(","))
  rows = []
  for b in (int(s) for s in args.batch.split(",")):
    rows += bench(b, n_in, n_out, args.repeats)
  print(common.markdown_table(
      ["batch", "layer", "method", "ms", "vs float", "resident B", "temp B"],
      [[r["batch"], f"{r['n_in']}x{r['n_out']}", r["method"],
        f"{r['ms']:.3f}", f"{r['vs_float']:.2f}x", f"{r['resident_bytes']:,}",
        "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes']:,}"]
       for r in rows]))
  print(f"\n{common.machine()}")
  return rows


if __name__ == "__main__":
  main()
