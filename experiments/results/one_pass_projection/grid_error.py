"""One pass over (w, D) at several start scales, against two rounds.

A prototype (not part of the library), run by ``run.sh`` in this folder.
It reuses the ``side`` protocol of :mod:`experiments.bench.projection_error`
(LAQ trains an MNIST MLP with converged projections; every step and quantized
kernel gives a problem ``(w, D)``, relative excess D-weighted error against
the converged projection) with other cheap schemes in place of its variants:

* ``alpha/R``: the library's ``R`` fixed rounds from the last scale
  (``R = 2`` is the default at 2 bits: two passes over ``(w, D)``);
* ``gridK@s``: ONE pass that forms the two sums of a round,
  ``S1 = sum(D |beta| |w|)`` and ``S2 = sum(D beta^2)``, for ``K`` start
  scales ``a (1 + s j)`` around the last scale ``a`` (``j = -1, 0, 1`` or
  ``-2 .. 2``); each start gives ``alpha_j = S1_j / S2_j`` with error
  ``sum(D w^2) - S1_j^2 / S2_j``, and the one with the largest
  ``S1_j^2 / S2_j`` is kept (never worse than one round from ``a`` itself);
* ``secant@s``: the same pass at ``a (1 - s)`` and ``a (1 + s)``, then the
  fixed point of the line through ``(a_j, alpha_j)`` (the alternation's
  fixed point if it were linear there; no error bound).
"""
import sys

import jax.numpy as jnp

from blaq_jax.projection import fused_sums
from experiments.bench import projection_error as pe

SCHEMES = [("grid3", s) for s in (0.0003, 0.001, 0.003, 0.01, 0.03)] + [
    ("grid5", s) for s in (0.0005, 0.001, 0.02)] + [
        ("secant", s) for s in (0.0003, 0.001, 0.003, 0.01)]


def one_pass(w, d, ls, starts, secant=False):
  aw, terms = jnp.abs(w), []
  for a in starts:
    m = ls.magnitude(aw / a)
    terms += [d * m * aw, d * m * m]
  # several sums in blocks of 8 (4-10 terms ran slower in blocks of 16)
  sums = fused_sums(terms, tuple(range(w.ndim)), block=8)
  alphas = jnp.stack([sums[2 * j] / sums[2 * j + 1]
                      for j in range(len(starts))])
  gains = jnp.stack([sums[2 * j] * alphas[j] for j in range(len(starts))])
  best = alphas[jnp.argmax(gains)]
  if secant:
    (a1, a2), (f1, f2) = starts, alphas
    slope = (f2 - f1) / (a2 - a1)
    fixed = (f1 - slope * a1) / (1 - slope)
    ok = jnp.isfinite(fixed) & (fixed > best / 2) & (fixed < 2 * best)
    best = jnp.where(ok, fixed, best)
  return best, ls.codes(w / best)


def scheme(w, d, ls, alpha, index):
  """Stands in for projection_error.plain_rounds (its ``rounds`` argument
  carries the index of the scheme)."""
  kind, s = SCHEMES[index]
  if kind == "secant":
    return one_pass(w, d, ls, [alpha * (1 - s), alpha * (1 + s)], True)
  js = (-1, 0, 1) if kind == "grid3" else (-2, -1, 0, 1, 2)
  return one_pass(w, d, ls, [alpha * (1 + s * j) for j in js])


def variants(_):
  out = {f"alpha/{r}": ("alpha", r) for r in (1, 2, 3)}
  out.update({f"{k}@{s}": ("plain", i) for i, (k, s) in enumerate(SCHEMES)})
  return out


if __name__ == "__main__":
  pe.plain_rounds, pe._variants = scheme, variants
  args = pe._parser().parse_args(sys.argv[1:])
  args.rounds = []
  x, y = pe._data(args)
  for bits in [int(b) for b in args.bits.split(",")]:
    side = pe.run(bits, args, x, y, scheme=None)
    print(f"LAQ, {bits} bits ({args.level_set}), {args.steps} steps x "
          f"{len(side['leaves'])} kernels, side protocol: relative excess "
          "D-weighted error against the converged projection")
    print("| scheme | n | mean | max | frac > 1e-6 | step-1 max |")
    print("|---|---|---|---|---|---|")
    for n, s in side["excess"].items():
      print(f"| {n} | {s['n']} | {s['mean']:.3g} | {s['max']:.3g} | "
            f"{s['frac_any']:.3g} | {s['first_step_max']:.3g} |")
