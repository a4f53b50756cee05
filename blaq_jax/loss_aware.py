"""LAQ and BLAQ: the loss-aware rule of the engine (:mod:`blaq_jax.engine`).

Adam's step of the latent weights and a projection weighted by the curvature
``D``; BLAQ adds a trial step and a backtrack, Algorithm 1 of its paper's
appendix (``algorithm_1`` in :func:`rule`). The transforms are
:func:`blaq_jax.laq` and :func:`blaq_jax.blaq`; the math, BLAQ's three
readings and how LAQ relates to the STE: ``docs/methods.rst``.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blaq_jax import engine
from blaq_jax import schedules
from blaq_jax import selection
from blaq_jax.levels import LevelSet
from blaq_jax.projection import BLENDED_SUM_BLOCK, project
from blaq_jax.state import (MASK, LossAwareState, TrialState, cosine,
                            fraction_changed)

BLENDS = ("moments", "lookahead", "gradients")


def rule(learning_rate, *, b1, b2, eps, trial, a=1.0, active=1,
         blend="moments", moments="real", opaque=True, keep_trial=False,
         trial_rounds=None):
  """The :class:`~blaq_jax.engine.Rule` of LAQ (``trial=False``) and BLAQ,
  for arguments :func:`blaq_jax.blaq` has checked (its docstring says what
  they mean)."""
  # A static a = 1 gives g* no weight in these readings: every step is LAQ's,
  # so no trial is traced (as on inactive steps) and no gradient is wasted.
  a_is_one = (blend != "gradients" and isinstance(a, (int, float, np.number))
              and not isinstance(a, (bool, np.bool_)) and a == 1)

  def init(params, quantized):
    leaves, treedef = jax.tree.flatten(params)
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    per_q = lambda on: treedef.unflatten(  # noqa: E731
        [jnp.zeros_like(p) if on and qi else MASK
         for p, qi in zip(leaves, quantized)])
    return LossAwareState(zeros(), zeros(), TrialState(
        jnp.zeros([], jnp.bool_), per_q(not opaque), per_q(keep_trial),
        per_q(keep_trial)) if trial else optax.EmptyState())

  def step(ctx, state):
    treedef = jax.tree.structure(ctx.params)
    leaves = treedef.flatten_up_to(ctx.params)
    q = ctx.is_quantized
    ix = [i for i, qi in enumerate(q) if qi]
    lr = learning_rate(ctx.count) if callable(learning_rate) else (
        learning_rate)
    a_t = a(ctx.count) if callable(a) else a
    t = optax.safe_increment(ctx.count)
    t2 = optax.safe_increment(t)
    curvature_fn = ctx.extra_args.get("curvature_fn")
    if trial and not opaque and curvature_fn is not None:
      raise ValueError("curvature_fn is supported in opaque mode only.")

    def tree(xs):
      return treedef.unflatten([x.astype(p.dtype) for x, p in zip(xs, leaves)])

    def q_tree(xs, on):
      return treedef.unflatten([x.astype(p.dtype) if (qi and on) else MASK
                                for x, p, qi in zip(xs, leaves, q)])

    def root_den(sq, count):
      """``eta D = sqrt(v_hat) + eps = (x + e) / r`` as triples ``(x, e, r)``:
      ``x = sqrt(v)``, ``r = sqrt(1 - b2^t)``, ``e = eps r``. The projection
      takes ``(x, e)`` (``D`` up to a constant): the stored roots, as is."""
      r = jnp.sqrt(1 - b2 ** jnp.asarray(count, jnp.float32))
      return [(s, eps * r, r) for s in sq]

    def total(d):
      # eta D of a triple, x (1 / r) + e / r: one product per entry (XLA does
      # not turn a division by a broadcast scalar into one), and not (x + e)
      # / r, which XLA would share with the projection's sum and materialise.
      return d[0] * (1 / d[2]) + d[1] / d[2]

    def unbias(mu, count):
      # optax.tree.bias_correction with one product per entry, not a division
      c = 1 / (1 - b1 ** jnp.asarray(count, jnp.float32))
      return [m * c for m in mu]

    def root_moment(x, s):  # sqrt(v) of Adam's v from g and sqrt(v_old)
      return jnp.sqrt(b2 * s * s + (1 - b2) * x * x)

    def adam_moments(g, mu, sq):  # Adam's, with sq = sqrt(v)
      return (optax.tree.update_moment(g, mu, b1, 1),
              [root_moment(x, s) for x, s in zip(g, sq)])

    def in_each_pass(fn, *arrays):
      """``fn(*arrays)`` as a weight the projection forms in each of its
      passes (a callable): each call reads ``arrays`` through a barrier of
      its own, so XLA shares no square root between the passes and writes
      none to memory (a full-size temporary written in a pass of its own
      and read back by each consumer)."""
      passes = itertools.count()  # a distinct barrier per pass (no CSE)
      return lambda: fn(*jax.lax.optimization_barrier(
          (*arrays, np.int32(next(passes))))[:-1])

    def formed(branch):
      """``branch`` whose weights are arrays: a ``cond`` writes them."""
      def run(g):
        w, weight, *rest = branch(g)
        return (w, [(d[0]() if callable(d[0]) else d[0], *d[1:])
                    for d in weight], *rest)
      return run

    def adam(g, mu, sq, count, at, guard=False):
      """Lines 13-15: moments of ``g`` and ``eta D`` (or of ``g*``: 22);
      ``sq`` holds ``sqrt(v)``, ``den`` triples (:func:`root_den`)."""
      new_mu, new_sq = adam_moments(g, mu, sq)
      if guard:  # kept if g is not finite; written once, read by the step
        new_mu, new_sq = jax.lax.optimization_barrier(
            optax.tree.where(ctx.finite, (new_mu, new_sq), (mu, sq)))
      mu, sq = new_mu, new_sq
      m_hat = unbias(mu, count)
      if curvature_fn is None:
        den = root_den(sq, count)
      else:
        user = curvature_fn(at)
        selection.check_same_structure(ctx.params, user,
                                       "curvature_fn's output")
        den = [(lr * x.astype(jnp.float32), 0.0, 1.0)
               for x in treedef.flatten_up_to(user)]
      return mu, sq, m_hat, den

    f32 = lambda tr: [x.astype(jnp.float32)  # noqa: E731
                      for x in treedef.flatten_up_to(tr)]
    mu0, nu0 = f32(state.mu), f32(state.sqrt_nu)

    def laq_step(g):
      mu, nu, m_hat, den = adam(g, mu0, nu0, t, ctx.params, guard=True)
      w = [w - lr * m / total(d) for w, m, d in zip(ctx.latent, m_hat, den)]
      return w, den, (mu, nu), state.trial, jnp.ones([], jnp.bool_), (
          trial_stats())

    def stored_den(den):
      """``den`` again from the stored (guarded) ``sqrt_nu`` (float32
      leaves): the engine's projection reads it, not a materialised ``D``."""
      if curvature_fn is not None:
        return den

      def weight(rule_state):
        stored = root_den(treedef.flatten_up_to(rule_state.sqrt_nu), t)
        return [s if p.dtype == jnp.float32 else x
                for s, x, p in zip(stored, den, leaves)]
      return weight

    def trial_stats(q_star=None, g=None, g_star=None, flips=None):
      """The trial's diagnostics (None when off); ``q_star``: ``(w*, scales
      of q*)``; no ``q_star`` or ``flips``: an inactive step."""
      if not ctx.diagnostics:
        return None
      z = jnp.zeros([], jnp.float32)
      if q_star is not None:
        flips = fraction_changed(
            [q_star[1][i].at(q_star[0][i]).codes for i in ix],
            [ctx.quantized[i].codes for i in ix],
            int(sum(np.prod(leaves[i].shape) for i in ix)))
      return dict(trial_active=(jnp.zeros if flips is None else jnp.ones)(
          [], jnp.bool_), trial_flip_fraction=z if flips is None else flips,
                  trial_grad_cosine=z if g_star is None else cosine(
                      [g[i] for i in ix], [g_star[i] for i in ix]))

    def backtrack(g, g_star, mu, nu, m_hat, den, trial_params):
      """Lines 21-24 of Algorithm 1 (the real step of quantized leaves)."""
      mu_s, nu_s, m_hat_s, den_s = adam(g_star, mu, nu, t2, trial_params)
      direction = {  # line 21, in the three readings (BLENDS)
          "moments": lambda i: a_t * m_hat[i] + (1 - a_t) * m_hat_s[i],
          "lookahead": lambda i: a_t * m_hat[i] + (1 - a_t) * g_star[i],
          "gradients": lambda i: a_t * g[i] + (1 - a_t) * g_star[i],
      }[blend]
      w, d_bar, mu_n, nu_n = list(ctx.latent), list(den), list(mu), list(nu)
      for i, w_i in enumerate(ctx.latent):
        if not q[i]:
          w[i] = w_i - lr * m_hat[i] / total(den[i])
          continue
        (x, e, r), (x_s, e_s, r_s) = den[i], den_s[i]  # line 23, in triples
        c = (1 - a_t) * (r / r_s)
        d_bar[i] = (a_t * x + c * x_s, a_t * e + c * e_s, r)
        w[i] = w_i - lr * direction(i) / total(d_bar[i])  # 24 (proj: engine)
        if curvature_fn is None:  # the sums form sqrt(v*) from g*, sqrt(v_t)
          d_bar[i] = (in_each_pass(lambda x, g_s, c=c: a_t * x + c * (
              root_moment(g_s, x)), x, g_star[i]), *d_bar[i][1:])
        if moments == "blended":
          mu_n[i] = a_t * mu[i] + (1 - a_t) * mu_s[i]
          nu_n[i] = jnp.sqrt(a_t * nu[i] ** 2 + (1 - a_t) * nu_s[i] ** 2)
      return w, d_bar, (mu_n, nu_n)

    def trial_point(g, guard=True):
      """Lines 13-16: moments, ``D_t``, ``w* = w_t - m_hat / D_t``, ``q*``
      (``w*`` as arrays, and as the projection reads it)."""
      mu, nu, m_hat, den = adam(g, mu0, nu0, t, ctx.params, guard=guard)
      w_star = [w - lr * m / total(d) if qi else w
                for w, m, d, qi in zip(ctx.latent, m_hat, den, q)]
      w_read, weight = w_star, den
      if not guard and curvature_fn is None:
        # Nothing is stored here: the sums form sqrt(v_t), and at 1 bit
        # (one pass) w* too, from (w_t, g, m, sqrt(v)); the trial params are
        # formed from them again, and w* is never written. In rounds w* is
        # written once and read by each: as many bytes at 2 rounds (formed
        # in each, the 2-bit step ran no faster), fewer from 3 on.
        def star(w, x, m, s, e, r):
          (m,), (s,) = adam_moments([x], [m], [s])
          return w - lr * unbias([m], t)[0] / total((s, e, r))
        w_read = [in_each_pass(star, w, x, m, s, *d[1:])
                  if qi and qt.level_set.bits == 1 else ws
                  for w, ws, x, m, s, d, qi, qt in zip(
                      ctx.latent, w_star, g, mu0, nu0, den, q,
                      ctx.quantized)]
        weight = [(in_each_pass(root_moment, x, s), *d[1:]) if qi else d
                  for x, s, d, qi in zip(g, nu0, den, q)]
      return mu, nu, m_hat, den, w_star, ctx.project(w_read, weight,
                                                      trial_rounds)

    def algorithm_1(g):
      """One active step of BLAQ, opaque mode (the appendix's numbering)."""
      mu, nu, m_hat, den, w_star, scales = trial_point(g, guard=False)
      trial_params = ctx.params_at(w_star, scales)
      g_star, finite = ctx.gradient(trial_params)  # 17-20
      # Only now is it known whether the step is skipped: the moments are
      # kept if g or g* is not finite, and written once for the backtrack.
      ok = jnp.logical_and(ctx.finite, finite)
      # Recomputed from (g, mu_t, v_t) behind a barrier rather than kept from
      # the trial: XLA then writes them in place once and keeps no copy.
      g_, m0_, v0_ = jax.lax.optimization_barrier((g, mu0, nu0))
      mu, nu = jax.lax.optimization_barrier(
          optax.tree.where(ok, adam_moments(g_, m0_, v0_), (m0_, v0_)))
      if curvature_fn is None:
        m_hat, den = unbias(mu, t), root_den(nu, t)
      w, d_bar, new_moments = backtrack(  # 21-24
          g, g_star, mu, nu, m_hat, den, trial_params)
      if moments == "blended":
        new_moments = optax.tree.where(ok, new_moments, (mu0, nu0))
      kept = optax.tree.where(ok, state.trial._replace(
          trial_latent=q_tree(w_star, keep_trial),
          trial_grad=q_tree(g_star, keep_trial)), state.trial)
      # The real projection continues from q*'s scale (engine.Step.start).
      return w, d_bar, new_moments, kept, finite, trial_stats(
          (w_star, scales), g, g_star), [
              sc.alpha if qi else None for sc, qi in zip(scales, q)]

    def result(w, weight, mu_nu, trial_state, finite, stats, start=None,
               gradients=1, commit=True):
      return engine.Step(
          latent=w, weight=weight,
          rule=LossAwareState(tree(mu_nu[0]), tree(mu_nu[1]), trial_state),
          finite=finite, commit=commit, gradients=gradients, trial=stats,
          guarded=not trial or opaque, start=start)

    if not trial:
      w, den, mu_nu, _, _, stats = laq_step(ctx.grads)
      return result(w, stored_den(den), mu_nu, state.trial, True, stats)
    on = False if a_is_one else schedules.is_active(active, ctx.count)
    if opaque and on is True:
      return result(*algorithm_1(ctx.grads), gradients=2)
    if opaque:  # under a traced schedule both branches start from q_t's scale
      w, weight, *rest = schedules.select(
          on, lambda g: formed(algorithm_1)(g)[:-1], laq_step, ctx.grads)
      return result(w, weight, *rest,
                    gradients=1 + jnp.asarray(on, jnp.int32))

    # Transparent mode: an active step takes two calls. The first moves the
    # params to the trial point q*; the second brings g* and backtracks.
    def start(g):
      mu, nu, _, den, w_star, scales = trial_point(g)
      return (w_star, den, (mu, nu), state.trial._replace(
          pending=jnp.ones([], jnp.bool_), real_grad=q_tree(g, True)),
              jnp.ones([], jnp.bool_), trial_stats((w_star, scales)),
              jnp.zeros([], jnp.bool_))

    def complete(g_star):
      g = [x.astype(jnp.float32) if qi else gs for x, gs, qi in zip(
          treedef.flatten_up_to(state.trial.real_grad), g_star, q)]
      w, d_bar, new_moments = backtrack(  # the params are at q* now
          g, g_star, mu0, nu0, unbias(mu0, t),
          root_den(nu0, t), ctx.params)
      return (w, d_bar, new_moments, state.trial._replace(
          pending=jnp.zeros([], jnp.bool_)), jnp.ones([], jnp.bool_),
              trial_stats(flips=getattr(  # the first call's
                  ctx.last_stats, "trial_flip_fraction", None)),
              jnp.ones([], jnp.bool_))

    out = jax.lax.cond(
        state.trial.pending, formed(complete), lambda g: schedules.select(
            on, start, lambda g: laq_step(g) + (jnp.ones([], jnp.bool_),), g),
        ctx.grads)
    return result(*out[:-1], commit=out[-1])

  return engine.Rule(init, step, _project, ("grad_fn",) if trial and opaque
                     else (), fixed_rounds=True)


def _project(w, d, level_set, prev, **options):
  """``proj_D`` (Algorithm 2), warm-started from the previous codes; ``d`` is
  a triple ``(x, e, r)`` with ``D`` proportional to ``x + e``. ``x`` may be
  a callable that forms it from several arrays in each pass (BLAQ's trial
  ``D_t`` and ``D_bar`` on statically active steps); its passes then sum in
  blocks of ``BLENDED_SUM_BLOCK`` (:func:`~blaq_jax.projection.project`'s
  ``sum_block``)."""
  x, e = (jnp.ones_like(w), 0.0) if d is None else d[:2]
  if callable(x):
    options["sum_block"] = BLENDED_SUM_BLOCK
  alpha, _ = project(w, x, level_set, eps=e,
                     prev_codes=None if prev is None else prev.codes,
                     prev_alpha=None if prev is None else prev.alpha,
                     **options)
  return alpha, None


def level_sets(level_set, bits):
  """``(params, quantize) -> [LevelSet or None per leaf]`` of LAQ and BLAQ."""
  return lambda params, quantize: [
      LevelSet(level_set, b) if b else None
      for b in selection.resolve_bits(params, quantize, bits, level_set)]
