"""LAQ and BLAQ: loss-aware weight quantization as Optax transforms.

One rule of the engine (:mod:`blaq_jax.engine`): Adam's step of the latent
weights and a projection weighted by the curvature ``D``; BLAQ adds a trial
step and a backtrack (:func:`blaq`). The math, BLAQ's three readings and
how LAQ relates to the STE: ``docs/methods.rst``.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blaq_jax import engine
from blaq_jax import selection
from blaq_jax.levels import KINDS, LevelSet, check_bits
from blaq_jax.projection import BLENDED_SUM_BLOCK, project
from blaq_jax.state import cosine, find_state, fraction_changed

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
Active = Union[int, Callable[[jax.Array], Any]]
BLENDS = ("moments", "lookahead", "gradients")
MASK = optax.MaskedNode()


class TrialState(NamedTuple):
  """BLAQ's trial (one-step-forward) state.

  Attributes:
    pending: transparent mode: True after a call that moved the params to
      the trial point ``q*``; the next call brings ``g*`` (else False).
    real_grad: transparent mode: the real gradient ``g_t`` of quantized
      leaves, kept for that second call (else MaskedNode).
    trial_latent, trial_grad: ``w*`` and ``g*`` of the last active step at
      quantized leaves (with ``keep_trial=True``, else MaskedNode).
  """

  pending: jax.Array
  real_grad: Any
  trial_latent: Any
  trial_grad: Any


class LossAwareState(NamedTuple):
  """The rule state of :func:`laq` and :func:`blaq` (field ``rule`` of
  :class:`~blaq_jax.engine.QuantizedLatentState`).

  Attributes:
    mu: Adam first moments of every leaf (at quantized leaves, of the
      gradient w.r.t. ``q``).
    sqrt_nu: ``sqrt(v)`` of Adam's second moments (roots, so that the
      projection's ``D``-weighted sums run no square root).
    trial: :class:`TrialState` (``optax.EmptyState()`` for LAQ).

  ``D`` is not stored: :func:`curvature` computes it.
  """

  mu: Any
  sqrt_nu: Any
  trial: Any


def curvature(opt_state, learning_rate: ScalarOrSchedule, *, b2: float = 0.999,
              eps: float = 1e-8):
  """The diagonal curvature ``D = (eps + sqrt(v_hat)) / eta`` of the state.

  Uses the stored ``sqrt_nu`` and count; ``b2``/``eps`` must be those of
  the transform. Returned for every leaf.
  """
  count = find_state(opt_state, "count")
  sqrt_nu = optax.tree.get(opt_state, "sqrt_nu")
  lr = learning_rate(count) if callable(learning_rate) else learning_rate
  c = jax.lax.rsqrt(1 - b2 ** count.astype(jnp.float32))
  return jax.tree.map(lambda s: (eps + s * c) / lr, sqrt_nu)


def _rule(learning_rate, *, b1, b2, eps, trial, a=1.0, active=1,
          blend="moments", moments="real", opaque=True, keep_trial=False,
          trial_rounds=None):
  """The :class:`~blaq_jax.engine.Rule` of LAQ (``trial=False``) and BLAQ."""
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
    on = False if a_is_one else engine.is_active(active, ctx.count)
    if opaque and on is True:
      return result(*algorithm_1(ctx.grads), gradients=2)
    if opaque:  # under a traced schedule both branches start from q_t's scale
      w, weight, *rest = engine.select(
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
        state.trial.pending, formed(complete), lambda g: engine.select(
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


def _level_sets(level_set, bits, b1, b2):
  """Checks the arguments LAQ and BLAQ share; their level sets per leaf."""
  bits = check_bits(bits, level_set if level_set in KINDS else "blaq")
  if level_set not in KINDS:
    raise ValueError(f"Unknown level_set {level_set!r}; expected one of "
                     f"{KINDS}.")
  for name, value in (("b1", b1), ("b2", b2)):
    engine.check_unit_interval(name, value)
  return lambda params, quantize: [
      LevelSet(level_set, b) if b else None
      for b in selection.resolve_bits(params, quantize, bits, level_set)]


@engine.with_options()
def laq(learning_rate: ScalarOrSchedule, *, bits: int = 1,
        level_set: str = "blaq", b1: float = 0.9, b2: float = 0.999,
        eps: float = 1e-8, **options) -> optax.GradientTransformationExtraArgs:
  """Loss-aware weight quantization (LAB / LAQ, Hou et al. 2017, 2018).

  .. math::

    w_{t+1} = w_t - \\eta_t \\frac{\\hat m_t}{\\epsilon + \\sqrt{\\hat v_t}},
    \\qquad q_{t+1} = \\operatorname{proj}_{D_t}(w_{t+1}),
    \\qquad D_t = (\\epsilon + \\sqrt{\\hat v_t}) / \\eta_t .

  The transform receives the gradient at the quantized weights and emits
  ``q_{t+1} - params``. It is :func:`blaq` without the trial stage.

  Args:
    learning_rate: float or Optax schedule ``eta_t``.
    bits: default bit width of quantized leaves (1..8).
    level_set: ``"blaq"`` (the BLAQ paper's set without zero, default),
      ``"linear"`` (with zero; 2 bits = ternary) or ``"log"``; see
      :mod:`blaq_jax.levels`.
    b1, b2, eps: Adam's hyper-parameters (also for full-precision leaves).
    **options: the engine's options (``quantize``, ``channel_axis``,
      ``clip_latent``, ``preprocess``, ``diagnostics``, ``batch_axis_name``,
      ``tol``, ``max_iter``): :func:`blaq_jax.engine.quantized_latent`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``(grads, state, params)`` and optionally ``curvature_fn(params) -> tree``
    to replace Adam's ``D`` by a user-supplied diagonal curvature.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blaq_jax
    >>> params = {"kernel": jnp.array([[0.5, -0.2], [0.1, 0.4]])}
    >>> loss = lambda p: jnp.sum((p["kernel"] - 0.3) ** 2)
    >>> opt = blaq_jax.laq(0.01)
    >>> state = opt.init(params)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> jnp.unique(jnp.abs(params["kernel"])).size  # one scale, two signs
    1
  """
  sets = _level_sets(level_set, bits, b1, b2)
  return engine.quantized_latent(
      _rule(learning_rate, b1=b1, b2=b2, eps=eps, trial=False), sets,
      who="laq", **options)


@engine.with_options()
def blaq(learning_rate: ScalarOrSchedule, *, bits: int = 1,
         a: ScalarOrSchedule = 0.6, active: Active = 1,
         blend: str = "lookahead", level_set: str = "blaq", b1: float = 0.9,
         b2: float = 0.999, eps: float = 1e-8, opaque: bool = True,
         moments: str = "real", keep_trial: bool = False,
         trial_rounds: Optional[int] = None,
         **options) -> optax.GradientTransformationExtraArgs:
  """BLAQ: LAQ with a one-step-forward trial and backtrack (Ma et al. 2024).

  One active step, numbered as Algorithm 1 of the paper's appendix:

  .. math::

    &\\text{13-15: } m_t, v_t \\text{ from } g_t,\\quad
      D_t = (\\epsilon + \\sqrt{\\hat v_t}) / \\eta \\\\
    &\\text{16: } w^* = w_t - \\hat m_t / D_t,\\quad
      q^* = \\operatorname{proj}_{D_t}(w^*) \\\\
    &\\text{17-20: } g^* = \\nabla \\ell(q^*) \\text{ on the same minibatch} \\\\
    &\\text{21: } d = \\text{the blend of the reading (below)} \\\\
    &\\text{22: } m^* = b_1 m_t + (1-b_1) g^*,\\ v^* = b_2 v_t + (1-b_2)
      g^{*2} \\text{ (corrected at } t+1),\\ D^* \\\\
    &\\text{23: } \\bar D = a D_t + (1 - a) D^* \\\\
    &\\text{24: } w_{t+1} = w_t - d / \\bar D,\\quad
      q_{t+1} = \\operatorname{proj}_{\\bar D}(w_{t+1})

  The paper does not say what its ``g_hat`` is; ``blend`` picks the reading
  of line 21 (:ref:`blaq-readings`):

  ===============  ====================================  ==================
  ``blend``        ``d``                                 weight of ``g*``
  ===============  ====================================  ==================
  ``"lookahead"``  ``a m_hat_t + (1-a) g*`` (default)    ``1-a``
  ``"moments"``    ``a m_hat_t + (1-a) m_hat*``          ``(1-a)(1-b1)``
  ``"gradients"``  ``a g_t + (1-a) g*`` (no momentum)    ``1-a``
  ===============  ====================================  ==================

  With ``b1 = 0`` the three coincide. ``"lookahead"`` is the default: it did
  best on real networks (the paired-seed regime map,
  ``experiments/README.md``). With ``a = 1`` (``"moments"``,
  ``"lookahead"``), or on steps where ``active`` is false, the update is
  exactly :func:`laq`'s; a constant ``a = 1`` takes no trial gradient (an
  ``a`` schedule at 1 does, and at 2 bits its scale is one round further
  than LAQ's: next paragraph).
  Theorem 2 of the paper: BLAQ converges faster than LAQ for
  ``2 / (L eta) - 1 < a < 1``. Full-precision leaves take Adam's step.

  Where the projection runs fixed rounds (2 bits by default), an active
  step in the opaque mode with a static ``active`` starts the real
  projection ``q_{t+1}`` from the trial's scale, not the last step's, and
  runs one round fewer (at least one): ``w*`` and ``w_{t+1}`` are both one
  step from ``w_t``. Over an MNIST run this saves one of the four rounds
  and leaves a mean relative excess D-weighted error at ``q_{t+1}`` of
  4.6e-7, max 4.8e-5 (2 rounds from the last scale: 2.5e-7, max 7.1e-5;
  ``experiments/results/one_pass_projection/``). A traced schedule
  (``lax.cond``) and the transparent mode start from the last scale.

  Args:
    learning_rate: float or Optax schedule.
    bits, level_set, b1, b2, eps: as in :func:`laq`.
    a: blend weight of the real step in ``[0, 1]`` (float or schedule of the
      step count). Paper: 0.6 (MNIST, SVHN, CIFAR-10), 0.9 (ImageNet).
    active: when to run the two-stage update: an int period in steps
      (``1`` = every step) or a callable ``step -> bool`` such as
      :func:`blaq_jax.one_epoch_every` (the paper's "one epoch out of every
      m"). On inactive steps no trial gradient is computed.
    blend: the reading of line 21: ``"lookahead"`` (default),
      ``"moments"`` or ``"gradients"`` (table above).
    opaque: ``True``: ``update(grads, state, params, *, grad_fn)`` calls
      ``grad_fn(trial_params) -> grads`` (same minibatch) inside the step.
      ``False`` (transparent): an active step takes two ``update`` calls, the
      first moving the params to ``q*``, the second given the gradient there;
      a loop feeding a new minibatch each call then takes ``g*`` on the next
      minibatch (and BatchNorm statistics at ``q*``): the opaque mode follows
      the paper exactly.
    moments: what the next step inherits: ``"real"`` (default; the moments
      of the real gradient, the trial is a look-ahead only) or ``"blended"``
      (``a m_t + (1-a) m*`` and likewise ``v``).
    keep_trial: also store ``w*`` and ``g*`` of the last active step in the
      state (two full-size buffers per quantized leaf).
    trial_rounds: ``None`` (default): the trial point's projection ``q*``
      runs the real step's rounds (the real projection then continues from
      its scale, above). An int: that many rounds where the
      projection runs fixed rounds (by default at 2 bits; converging ones,
      above 2 bits or with ``tol > 0``, converge at ``q*`` too). ``q*`` only
      locates ``g*``: ``1`` saves one more of the active 2-bit step's
      rounds and leaves a mean relative excess D-weighted error at ``q*`` of
      1.3e-6 (max 1.9e-4; 2 rounds: 4.7e-7, max 7.5e-5) over an MNIST run
      (``experiments/results/projection_error.md``).
    **options: the engine's options (:func:`laq`); ``preprocess`` also
      reaches the trial gradient, and under ``pmap``/``shard_map``
      ``batch_axis_name`` averages the trial gradient like the main one.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blaq_jax
    >>> target = jnp.array([[0.3, -0.2], [0.25, -0.35]])
    >>> loss = lambda p: jnp.sum((p["kernel"] - target) ** 2)
    >>> params = {"kernel": jnp.array([[0.1, 0.1], [-0.1, 0.1]])}
    >>> opt = blaq_jax.blaq(0.05, a=0.6, blend="lookahead")
    >>> state = opt.init(params)
    >>> for _ in range(100):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = opt.update(grads, state, params,
    ...                               grad_fn=jax.grad(loss))
    ...   params = optax.apply_updates(params, updates)
    >>> jnp.sign(params["kernel"]).tolist()
    [[1.0, -1.0], [1.0, -1.0]]
  """
  sets = _level_sets(level_set, bits, b1, b2)
  engine.check_unit_interval("a", a)
  engine.check_active(active)
  if blend not in BLENDS:
    raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}.")
  if moments not in ("real", "blended"):
    raise ValueError(f"moments must be 'real' or 'blended', got {moments!r}.")
  if trial_rounds is not None and (
      isinstance(trial_rounds, (bool, np.bool_))
      or not isinstance(trial_rounds, (int, np.integer)) or trial_rounds < 1):
    raise ValueError(
        f"trial_rounds must be None or a static int >= 1, got "
        f"{trial_rounds!r} (under optax.inject_hyperparams pass it in "
        "static_args).")
  rule = _rule(learning_rate, b1=b1, b2=b2, eps=eps, trial=True, a=a,
               active=active, blend=blend, moments=moments, opaque=opaque,
               keep_trial=keep_trial, trial_rounds=trial_rounds)
  return engine.quantized_latent(rule, sets, who="blaq", **options)
