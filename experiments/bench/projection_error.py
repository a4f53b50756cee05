"""Excess D-weighted projection error of the fixed-round k-bit projection.

LAQ's k-bit projection (Algorithm 2) alternates ``beta = nearest(w / alpha)``
and ``alpha = sum(d beta w) / sum(d beta^2)``. The converged scheme
(``tol=1e-7``, warm-started from the last codes) runs until ``alpha`` stops
moving; the cheap scheme (``tol=None``) runs a fixed ``R`` rounds. On a real
training trajectory (LAQ on an MNIST subset, an MLP, ``k`` bits) every step
and every quantized kernel gives a projection problem ``(w_{t+1}, D_t)``;
for each we compare

.. math::

  E = \\sum_i D_i (w_i - \\alpha \\beta_i)^2, \\qquad
  \\text{relative excess} = (E_\\text{cheap} - E_\\text{conv}) / E_\\text{conv}

(computed in float64 from the returned ``alpha`` and codes). Two protocols:

* ``own``: the training runs with the cheap scheme itself (the engine's
  ``laq(..., tol=None, max_iter=R)``, which starts each step from the last
  scale), so its warm starts come from its own, possibly inexact, past; at
  each step the converged projection of the same ``(w, D)`` is the reference.
* ``side``: the training runs with the converged scheme; at each step every
  cheap variant projects the same ``(w, D)`` in ``R`` passes: ``R`` rounds
  from the last scale (``alpha/R``, what ``tol=None`` does: from ``R = 3``
  on with an Aitken start every third round and the best round kept), the
  same without Aitken (``plain/R``, ``R >= 3``), ``R`` rounds
  from :func:`extrapolate` of the last two scales (``extrap/R``), or the old
  warm start from the last codes (``codes/R``: the first pass forms
  ``alpha = sum(d beta_prev w) / sum(d beta_prev^2)``, then ``R - 1``
  rounds).

Also recorded: the rounds the converged loop takes per step (step 1, the
first after ``init``, separately) and the training loss. ``--method ste``
trains ``ste(quantizer="uniform", scale="fit")`` instead, whose projection
is the same alternation with ``D = 1``. ``--method blaq`` trains BLAQ (every
step active, ``keep_trial=True``) and measures its trial point's problems
``(w*, D_t)`` instead: ``own`` trains with ``trial_rounds=R`` (the real step
at the library's default) and projects each ``w*`` in ``R`` rounds from the
last scale, as the step did; ``side`` trains with converged projections.

Usage::

  python -m experiments.bench.projection_error \\
      --out experiments/results/projection_error.json
  python -m experiments.bench.projection_error --method ste \\
      --level-set linear --bits 2,3 --out experiments/results/projection_error_ste.json
  python -m experiments.bench.projection_error --method blaq --bits 2 \\
      --rounds 1,2 --out experiments/results/projection_error_blaq_trial.json

Example:
  >>> import contextlib, io
  >>> from experiments.bench.projection_error import main
  >>> with contextlib.redirect_stdout(io.StringIO()):
  ...   out = main(["--synthetic", "--steps", "3", "--hidden", "8",
  ...               "--bits", "2", "--rounds", "1", "--out", ""])
  >>> sorted(out["results"]["2"])
  ['own', 'side']
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import blaq_jax
from blaq_jax.levels import LevelSet
from blaq_jax.projection import extrapolate, fused_sums, project
from experiments.bench import common

B2, EPS = 0.999, 1e-8
CONVERGED = dict(tol=1e-7, max_iter=500)
# Relative excess above this counts as "any excess" (float32 round-off of two
# schemes that reach the same codes is about 1e-7).
EXCESS_THRESHOLD = 1e-6


def rounds_to_converge(w, d, level_set, prev_codes, tol, max_iter):
  """Rounds the ``tol > 0`` loop of :func:`project` takes (same start)."""
  def alpha_for(beta):
    db = d * beta
    s1, s2 = fused_sums([db * w, db * beta], tuple(range(w.ndim)))
    return jnp.where(s2 > 0, s1 / jnp.where(s2 > 0, s2, 1.0), 1.0)

  alpha0 = alpha_for(level_set.decode(prev_codes))

  def cond(c):
    i, a, prev = c
    return jnp.logical_and(i < max_iter, jnp.abs(a - prev) >= tol)

  def body(c):
    i, a, _ = c
    return i + 1, alpha_for(level_set.nearest(w / a)), a

  alpha1 = alpha_for(level_set.nearest(w / alpha0))
  return jax.lax.while_loop(cond, body, (1, alpha1, alpha0))[0]


def codes_start(w, d, level_set, prev_codes, passes):
  """The old warm start in ``passes`` fixed passes: ``alpha`` from the last
  codes, then ``passes - 1`` rounds, then the codes at the final ``alpha``."""
  def alpha_for(beta):
    db = d * beta
    s1, s2 = fused_sums([db * w, db * beta], tuple(range(w.ndim)))
    return jnp.where(s2 > 0, s1 / jnp.where(s2 > 0, s2, 1.0), 1.0)

  alpha = alpha_for(level_set.decode(prev_codes))
  for _ in range(passes - 1):
    alpha = alpha_for(level_set.nearest(w / alpha))
  return alpha, level_set.codes(w / alpha)


def _mlp(params, x):
  h = x.reshape(x.shape[0], -1)
  names = sorted(params)
  for i, name in enumerate(names):
    h = h @ params[name]["kernel"] + params[name]["bias"]
    if i < len(names) - 1:
      h = jax.nn.relu(h)
  return h


def _data(args):
  if args.synthetic:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n_train, 28, 28, 1)).astype(np.float32)
    y = (x.reshape(args.n_train, -1)[:, :10].argmax(1)).astype(np.int32)
    return x, y
  from experiments.data import load_mnist  # pylint: disable=g-import-not-at-top
  x, y = load_mnist()["train"]
  x = np.asarray(x[:args.n_train], np.float32)
  return (x - x.mean()) / x.std(), np.asarray(y[:args.n_train], np.int32)


def _batches(x, y, batch, steps, seed):
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(len(x))
                          for _ in range(steps * batch // len(x) + 1)])
  for t in range(steps):
    idx = order[t * batch:(t + 1) * batch]
    yield jnp.asarray(x[idx]), jnp.asarray(y[idx])


def plain_rounds(w, d, level_set, alpha, rounds):
  """``rounds`` plain alternations from ``alpha`` (no Aitken, last kept)."""
  def alpha_for(beta):
    db = d * beta
    s1, s2 = fused_sums([db * w, db * beta], tuple(range(w.ndim)))
    return jnp.where(s2 > 0, s1 / jnp.where(s2 > 0, s2, 1.0), alpha)

  for _ in range(rounds):
    alpha = alpha_for(level_set.nearest(w / alpha))
  return alpha, level_set.codes(w / alpha)


def _variants(rounds):
  out = {}
  for r in rounds:
    out[f"alpha/{r}"] = ("alpha", r)
    if r >= 3:
      out[f"plain/{r}"] = ("plain", r)
    out[f"codes/{r}"] = ("codes", r)
    out[f"extrap/{r}"] = ("extrap", r)
  return out


def make_optimizer(method: str, lr: float, bits: int, level_set: str,
                   **kw) -> optax.GradientTransformationExtraArgs:
  """The trained method: LAQ (``D`` from Adam), or the STE with a fitted
  scale (``ste(quantizer="uniform", scale="fit")``: ``D = 1``)."""
  if method == "laq":
    return blaq_jax.laq(lr, bits=bits, level_set=level_set, **kw)
  if method == "blaq":
    return blaq_jax.blaq(lr, bits=bits, level_set=level_set, keep_trial=True,
                         **kw)
  return blaq_jax.ste(lr, quantizer="uniform", bits=bits, level_set=level_set,
                      scale="fit", **kw)


def run(bits: int, args, x, y, *, scheme: Optional[int]) -> Dict[str, Any]:
  """One training trajectory; ``scheme=None`` trains with the converged
  projection (``side`` protocol), ``R`` with ``R`` fixed rounds (``own``)."""
  ls = LevelSet(args.level_set, bits)
  sizes = (x[0].size,) + (args.hidden,) * args.layers + (10,)
  params = common.mlp_params(sizes, seed=args.seed)
  trial = args.method == "blaq"
  opt_kw = (CONVERGED if scheme is None else dict(trial_rounds=scheme)
            if trial else dict(tol=None, max_iter=scheme))
  opt = make_optimizer(args.method, args.lr, bits, args.level_set, **opt_kw)
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)

  def loss_fn(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(
        _mlp(p, xb), yb).mean()

  @jax.jit
  def train_step(p, s, xb, yb):
    loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
    u, s = opt.update(g, s, p, grad_fn=lambda q: jax.grad(loss_fn)(q, xb, yb))
    return optax.apply_updates(p, u), s, loss

  variants = _variants(args.rounds) if scheme is None else (
      {"own": ("alpha", scheme)} if trial else {})

  @jax.jit
  def projections(w, d, prev_alpha, before_alpha, prev_codes):
    out = {"conv": project(w, d, ls, prev_codes=prev_codes,
                           prev_alpha=prev_alpha, **CONVERGED)}
    out["engine_default"] = project(w, d, ls, prev_codes=prev_codes,
                                    prev_alpha=prev_alpha, tol=1e-6,
                                    max_iter=20)
    for name, (start, r) in variants.items():
      if start == "alpha":
        out[name] = project(w, d, ls, prev_alpha=prev_alpha, tol=None,
                            max_iter=r)
      elif start == "plain":
        out[name] = plain_rounds(w, d, ls, prev_alpha, r)
      elif start == "extrap":
        out[name] = project(w, d, ls, prev_alpha=prev_alpha,
                            start_alpha=extrapolate(prev_alpha, before_alpha),
                            tol=None, max_iter=r)
      else:
        out[name] = codes_start(w, d, ls, prev_codes, r)
    n_rounds = rounds_to_converge(w, d, ls, prev_codes, 1e-6, 20)
    return out, n_rounds

  def error(w, d, alpha, codes):
    q = float(alpha) * ls.values.astype(np.float64)[np.asarray(codes)]
    return float(np.sum(d * (w - q) ** 2))

  paths = [k for k in ("dense0", "dense1", "dense2", "dense3")
           if k in params][:args.layers + 1]
  names = ["conv", "engine_default"] + (list(variants) or ["own"])
  excess = {n: [] for n in names if n != "conv"}
  rounds_needed, losses, check = [], [], 0.0
  before = {p: state.quantized[p]["kernel"].alpha for p in paths}
  for t, (xb, yb) in enumerate(_batches(x, y, args.batch, args.steps,
                                        args.seed)):
    qts = blaq_jax.quantized_tensors(state)  # derives every leaf's codes
    prev = {p: qts[p]["kernel"] for p in paths}
    params, new_state, loss = train_step(params, state, xb, yb)
    new_qts = blaq_jax.quantized_tensors(new_state)
    losses.append(float(loss))
    count = int(new_state.count)
    for p in paths:
      w = (optax.tree.get(new_state, "trial_latent") if trial
           else new_state.latent)[p]["kernel"]  # w*, or w_{t+1}
      if args.method != "ste":  # D_t up to the 1/lr factor
        root = new_state.rule.sqrt_nu[p]["kernel"]
        d = EPS + root / jnp.sqrt(1 - B2 ** count)
      else:
        d = jnp.ones_like(w)
      out, n_rounds = projections(w, d, prev[p].alpha, before[p],
                                  prev[p].codes)
      rounds_needed.append((t + 1, p, int(n_rounds)))
      w64 = np.asarray(w, np.float64)
      d64 = np.asarray(d, np.float64)
      e_conv = error(w64, d64, *out["conv"])
      got = new_qts[p]["kernel"]
      if not trial:  # (BLAQ's q* is not stored: its "own" is a variant)
        if scheme is not None:
          out["own"] = (got.alpha, got.codes)
        else:  # the trajectory's own projection is the converged one
          check = max(check,
                      abs(float(got.alpha) / float(out["conv"][0]) - 1))
      for n in excess:
        e = error(w64, d64, *out[n])
        excess[n].append((e - e_conv) / e_conv if e_conv > 0 else 0.0)
      before[p] = prev[p].alpha
    state = new_state

  def summary(xs, first):
    xs = np.asarray(xs)
    return dict(n=int(xs.size), mean=float(xs.mean()), max=float(xs.max()),
                min=float(xs.min()),
                frac_any=float(np.mean(xs > EXCESS_THRESHOLD)),
                frac_worse=float(np.mean(xs > 0)),
                first_step_max=float(np.max(xs[:first])))
  per_step = len(paths)
  rn = np.asarray([r for _, _, r in rounds_needed])
  return dict(
      scheme="converged" if scheme is None else f"{scheme} rounds",
      leaves=paths, steps=args.steps,
      loss_first=losses[0], loss_last10=float(np.mean(losses[-10:])),
      rounds_to_converge=dict(
          first_step=[int(r) for r in rn[:per_step]],
          later_mean=float(rn[per_step:].mean()) if rn.size > per_step
          else float("nan"),
          later_max=int(rn[per_step:].max()) if rn.size > per_step else 0,
          at_cap=float(np.mean(rn >= 20))),
      converged_vs_trajectory_alpha=check,
      excess={n: summary(v, per_step) for n, v in excess.items()},
      raw_excess={n: [float(e) for e in v] for n, v in excess.items()}
      if args.raw else None)


def _parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--method", choices=("laq", "ste", "blaq"), default="laq",
                 help="laq (D-weighted), ste (uniform quantizer, fitted "
                 "scale, D = 1) or blaq (its trial point's projections)")
  p.add_argument("--level-set", default="blaq",
                 help="level set of the quantized kernels")
  p.add_argument("--bits", default="2,3")
  p.add_argument("--rounds", default="1,2,3,4")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch", type=int, default=100)
  p.add_argument("--n-train", type=int, default=6000)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--layers", type=int, default=2,
                 help="hidden layers of the MLP")
  p.add_argument("--lr", type=float, default=0.005)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--synthetic", action="store_true",
                 help="random inputs instead of MNIST (smoke runs)")
  p.add_argument("--raw", action="store_true",
                 help="also store every step's relative excess")
  p.add_argument("--out", default="experiments/results/projection_error.json",
                 help="JSON output ('' to skip writing)")
  return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  args = _parser().parse_args(argv)
  args.rounds = [int(r) for r in args.rounds.split(",") if r]
  bits_list = [int(b) for b in args.bits.split(",") if b]
  x, y = _data(args)
  t0 = time.time()
  results = {}
  for bits in bits_list:
    side = run(bits, args, x, y, scheme=None)
    own = {str(r): run(bits, args, x, y, scheme=r) for r in args.rounds}
    results[str(bits)] = dict(side=side, own=own)
    print(f"\n{args.method}, {bits} bits ({args.level_set}): {args.steps} "
          f"steps x {len(side['leaves'])} kernels; relative excess "
          "D-weighted error vs converged")
    print(common.markdown_table(
        ["protocol", "scheme", "n", "mean", "max", "frac > 1e-6",
         "step-1 max", "final loss"],
        [["own", f"{r} rounds", o["excess"]["own"]["n"],
          o["excess"]["own"]["mean"], o["excess"]["own"]["max"],
          o["excess"]["own"]["frac_any"],
          o["excess"]["own"]["first_step_max"], o["loss_last10"]]
         for r, o in own.items()] +
        [["side", n, s["n"], s["mean"], s["max"], s["frac_any"],
          s["first_step_max"], side["loss_last10"]]
         for n, s in side["excess"].items()]))
    rc = side["rounds_to_converge"]
    print(f"converged loop (tol 1e-6, cap 20): step 1 {rc['first_step']} "
          f"rounds, later mean {rc['later_mean']:.2f}, max {rc['later_max']}")
  out = dict(command="python -m experiments.bench.projection_error " +
             " ".join(argv if argv is not None else sys.argv[1:]),
             config=dict(vars(args)), machine=common.machine(),
             seconds=time.time() - t0, excess_threshold=EXCESS_THRESHOLD,
             converged=CONVERGED, results=results)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
    print(f"\nwrote {args.out}")
  return out


if __name__ == "__main__":
  main()
