"""Time of one pass forming a round's sums for K start scales.

A prototype run by ``run.sh``: on one 2048x2048 leaf (w ~ N(0, 0.01^2),
d = |N(0, 1e-3^2)|), jitted, interleaved, median of 20: the library's one
round (``one round``: two sums in blocks of 16), K rounds' sums in K
separate passes (``K passes``), and all 2K sums in one pass in blocks of 8
(``one pass, K starts``, as grid_error.py's scheme).
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from blaq_jax.levels import LevelSet
from blaq_jax.projection import fused_sums

LS = LevelSet("blaq", 2)


def starts(a, k):
  return [a * (1 + 0.01 * (j - (k - 1) / 2)) for j in range(k)]


def separate(k):
  def f(w, d, a):
    out = []
    for s in starts(a, k):
      m = LS.magnitude(jnp.abs(w / s))
      out.append(fused_sums([d * m * jnp.abs(w), d * m * m], (0, 1)))
    return out
  return f


def one_pass(k):
  def f(w, d, a):
    terms = []
    for s in starts(a, k):
      m = LS.magnitude(jnp.abs(w / s))
      terms += [d * m * jnp.abs(w), d * m * m]
    return fused_sums(terms, (0, 1), block=8)
  return f


if __name__ == "__main__":
  w = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048)) * 0.01
  d = jnp.abs(jax.random.normal(jax.random.PRNGKey(1), (2048, 2048))) * 1e-3
  a = jnp.float32(0.01)
  fns = {"one round": jax.jit(separate(1))}
  for k in (2, 3, 5):
    fns[f"{k} passes"] = jax.jit(separate(k))
    fns[f"one pass, {k} starts"] = jax.jit(one_pass(k))
  for f in fns.values():
    jax.block_until_ready(f(w, d, a))
  times = {k: [] for k in fns}
  for _ in range(20):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(w, d, a))
      times[k].append(time.perf_counter() - t)
  base = np.median(times["one round"])
  print("| sums of | ms | x one round |")
  print("|---|---|---|")
  for k, v in times.items():
    print(f"| {k} | {np.median(v) * 1e3:.3f} | {np.median(v) / base:.2f} |")
