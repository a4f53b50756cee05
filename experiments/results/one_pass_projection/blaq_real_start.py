"""BLAQ's real projection started from its trial projection's scale.

A prototype run by ``run.sh``. On an active 2-bit step BLAQ projects twice
(Algorithm 1): the trial point ``w* = w_t - m_hat_t / D_t`` with ``D_t``
(line 16) and the real step ``w_{t+1}`` with ``D_bar = a D_t + (1 - a) D*``
(line 24); by default each in 2 fixed rounds from the last step's scale.
The trial's scale is a nearer start for the real projection than the last
step's: both points are one step from ``w_t``. Protocol as
:mod:`experiments.bench.projection_error`'s ``side``: BLAQ (``a = 0.6``,
every step active, ``keep_trial=True``) trains an MNIST MLP with converged
projections; at each step and kernel, ``D_t`` and ``D_bar`` are rebuilt from
the stored ``sqrt(v_t)`` and ``g*`` (up to the factor ``1 / eta``) and the
real problem ``(w_{t+1}, D_bar)`` is projected by

* ``last/R``: ``R`` rounds from the last step's scale (``R = 2``: the
  library's default);
* ``trialT>R``: the trial problem ``(w*, D_t)`` in ``T`` rounds from the last
  scale, then the real one in ``R`` rounds from that scale (``T + R``
  passes in all, against 4 for the default);
* ``trial2 itself``: the trial's scale (2 rounds) as the real step's scale.

Relative excess D-weighted error against the converged projection of the
same real problem, warm-started from the last codes as the trajectory's own
(whose stored scale it must match: the check that ``D_bar`` is rebuilt
right).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import blaq_jax
from blaq_jax.levels import LevelSet
from blaq_jax.projection import project
from experiments.bench import common
from experiments.bench import projection_error as pe

A = 0.6


def main(argv):
  args = pe._parser().parse_args(argv)
  bits, (b2, eps) = int(args.bits), (pe.B2, pe.EPS)
  x, y = pe._data(args)
  ls = LevelSet(args.level_set, bits)
  params = common.mlp_params((x[0].size,) + (args.hidden,) * args.layers
                             + (10,), seed=args.seed)
  opt = blaq_jax.blaq(args.lr, a=A, bits=bits, level_set=args.level_set,
                      keep_trial=True, **pe.CONVERGED)
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)

  def loss_fn(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(
        pe._mlp(p, xb), yb).mean()

  @jax.jit
  def train_step(p, s, xb, yb):
    loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
    u, s = opt.update(g, s, p,
                      grad_fn=lambda q: jax.grad(loss_fn)(q, xb, yb))
    return optax.apply_updates(p, u), s, loss

  @jax.jit
  def schemes(w, d, w_s, d_s, last, last_codes):
    def rounds(w, d, start, r):
      return project(w, d, ls, prev_alpha=start, tol=None, max_iter=r)[0]
    out = {"conv": project(w, d, ls, prev_codes=last_codes, prev_alpha=last,
                           **pe.CONVERGED)[0]}
    out["last/1"], out["last/2"] = rounds(w, d, last, 1), rounds(w, d, last, 2)
    t1, t2 = rounds(w_s, d_s, last, 1), rounds(w_s, d_s, last, 2)
    out["trial1>1"], out["trial1>2"] = rounds(w, d, t1, 1), rounds(w, d, t1, 2)
    out["trial2>1"], out["trial2>2"] = rounds(w, d, t2, 1), rounds(w, d, t2, 2)
    out["trial2 itself"] = t2
    return out

  def error(w, d, alpha):
    codes = np.asarray(ls.codes(jnp.asarray(w, jnp.float32) / alpha))
    return float(np.sum(d * (w - float(alpha)
                             * ls.values.astype(np.float64)[codes]) ** 2))

  paths = ["dense%d" % i for i in range(args.layers + 1)]
  excess, check = {}, []
  for xb, yb in pe._batches(x, y, args.batch, args.steps, args.seed):
    qts = blaq_jax.quantized_tensors(state)
    last = {p: qts[p]["kernel"] for p in paths}
    params, state, loss = train_step(params, state, xb, yb)
    t = int(state.count)
    r, r_s = np.sqrt(1 - b2 ** t), np.sqrt(1 - b2 ** (t + 1))
    for p in paths:
      w = state.latent[p]["kernel"]
      root = state.rule.sqrt_nu[p]["kernel"]  # sqrt(v_t) (moments="real")
      g_s = optax.tree.get(state, "trial_grad")[p]["kernel"]
      root_s = jnp.sqrt(b2 * root * root + (1 - b2) * g_s * g_s)  # sqrt(v*)
      d_t = eps + root / r
      d_bar = A * d_t + (1 - A) * (eps + root_s / r_s)
      out = schemes(w, d_bar, optax.tree.get(state, "trial_latent")[p][
          "kernel"], d_t, last[p].alpha, last[p].codes)
      w64, d64 = np.asarray(w, np.float64), np.asarray(d_bar, np.float64)
      stored = blaq_jax.quantized_tensors(state)[p]["kernel"].alpha
      check.append(abs(float(out["conv"]) / float(stored) - 1))
      e_conv = error(w64, d64, out.pop("conv"))
      for k, alpha in out.items():
        excess.setdefault(k, []).append((error(w64, d64, alpha) - e_conv)
                                        / e_conv)
  print(f"BLAQ (a = {A}, every step active), {bits} bits "
        f"({args.level_set}), {args.steps} steps x {len(paths)} kernels, "
        f"last loss {float(loss):.4f}: relative excess D-weighted error of "
        "the real projection against the converged one (warm-started from "
        "the last codes, as the trajectory's own, whose scales it matches to at "
        f"most {max(check):.2g} relative)")
  print("| scheme | n | mean | max | frac > 1e-6 | step-1 max |")
  print("|---|---|---|---|---|---|")
  for k, v in excess.items():
    v = np.asarray(v)
    print(f"| {k} | {v.size} | {v.mean():.3g} | {v.max():.3g} | "
          f"{np.mean(v > 1e-6):.3g} | {v[:len(paths)].max():.3g} |")


if __name__ == "__main__":
  main(sys.argv[1:])
