"""LAQ and BLAQ: loss-aware weight quantization as Optax transforms.

Per quantized tensor, with ``g`` the gradient of the loss at the quantized
weights ``q_t`` (what the transform receives as ``updates``), Adam moments and
the diagonal curvature of LAB,

.. math::

  \\hat m_t = \\frac{m_t}{1 - b_1^t},\\quad
  D_t = \\frac{\\epsilon + \\sqrt{\\hat v_t}}{\\eta_t},

**LAQ** (Hou et al.) takes ``w_{t+1} = w_t - \\hat m_t / D_t`` and
``q_{t+1} = \\operatorname{proj}_{D_t}(w_{t+1})``.

**BLAQ** (Ma et al., AAAI 2024, Algorithm 1) first takes the same step as a
trial, ``w^* = w_t - \\hat m_t / D_t``, ``q^* = \\operatorname{proj}_{D_t}(w^*)``,
evaluates ``g^* = \\nabla \\ell(q^*)`` on the same minibatch, forms trial
moments ``m^*, v^*`` (bias-corrected at ``t + 1``) and backtracks:

.. math::

  \\bar m = a \\hat m_t + (1 - a) \\hat m^*,\\quad
  \\bar D = a D_t + (1 - a) D^*,\\quad
  w_{t+1} = w_t - \\bar m / \\bar D,\\quad
  q_{t+1} = \\operatorname{proj}_{\\bar D}(w_{t+1}).

LAQ is BLAQ without the trial stage: both are built by one function here, and
on steps where BLAQ's ``active`` schedule is false the update is LAQ's and no
trial gradient is computed (``lax.cond``).

Both emit ``updates = q_{t+1} - params`` so that ``optax.apply_updates`` lands
on the quantized weights. Leaves that are not quantized (see
:mod:`blaq_jax.selection`) are trained by plain Adam with the same
hyper-parameters.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blaq_jax import parallel
from blaq_jax import selection
from blaq_jax.levels import KINDS, LevelSet, check_bits
from blaq_jax.projection import project
from blaq_jax.state import Diagnostics, QuantizedTensor, init_diagnostics
from blaq_jax.state import StepCost, make_cost
from blaq_jax.state import cosine as _cosine
from blaq_jax.state import fraction_changed as _fraction_changed

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
Active = Union[int, Callable[[jax.Array], Any]]


class TrialState(NamedTuple):
  """BLAQ's trial (one-step-forward) state.

  Attributes:
    pending: transparent mode only: True after a call that moved the params
      to the trial point ``q*``; the next call's gradient is the trial
      gradient ``g*`` and completes the step. Always False in opaque mode.
    trial_latent: the trial latent weights ``w*`` of the last active step
      (quantized leaves; only with ``keep_trial=True``, else MaskedNode).
    trial_grad: the trial gradient ``g*`` of the last active step (same).
  """

  pending: jax.Array
  trial_latent: Any
  trial_grad: Any


class LossAwareState(NamedTuple):
  """State of :func:`laq` and :func:`blaq`.

  Attributes:
    count: number of completed (real) steps, int32.
    mu: Adam first moments of every leaf (of the gradient w.r.t. ``q`` for
      quantized leaves).
    nu: Adam second moments of every leaf.
    latent: latent full-precision weights ``w`` (MaskedNode at leaves trained
      in full precision).
    quantized: :class:`~blaq_jax.state.QuantizedTensor` (codes and ``alpha``)
      of the current quantized weights ``q_t`` (MaskedNode elsewhere).
    prev_update: the last latent update ``w_{t} - w_{t-1}`` of quantized leaves
      (for ``update_cosine``; MaskedNode when ``diagnostics=False``).
    trial: :class:`TrialState`.
    diagnostics: :class:`~blaq_jax.state.Diagnostics`.
    cost: :class:`~blaq_jax.state.StepCost` of the last step.

  The curvature ``D`` is not stored (it is a function of ``nu`` and
  ``count``): :func:`curvature` computes it.
  """

  count: jax.Array
  mu: Any
  nu: Any
  latent: Any
  quantized: Any
  prev_update: Any
  trial: TrialState
  diagnostics: Diagnostics
  cost: StepCost


_MASK = optax.MaskedNode()
BLENDS = ("moments", "lookahead", "gradients")


def _is_node(x):
  return isinstance(x, (optax.MaskedNode, QuantizedTensor))


def _flat(treedef, tree):
  return treedef.flatten_up_to(tree)


def _check_unit_interval(name, value):
  if callable(value) or isinstance(value, jax.core.Tracer):
    return
  v = np.asarray(value)
  if v.shape != () or not 0.0 <= float(v) <= 1.0:
    raise ValueError(f"{name} must be a scalar in [0, 1], got {value!r}.")


def curvature(opt_state, learning_rate: ScalarOrSchedule, *, b2: float = 0.999,
              eps: float = 1e-8):
  """The diagonal curvature ``D = (eps + sqrt(v_hat)) / eta`` of the state.

  Uses the stored second moment (``nu``) and count; ``b2``/``eps`` must be
  those of the transform. MaskedNode-free: returned for every leaf.
  """
  from blaq_jax.state import _find  # pylint: disable=g-import-not-at-top
  count = _find(opt_state, "count")
  nu = _find(opt_state, "nu")
  lr = learning_rate(count) if callable(learning_rate) else learning_rate
  bc = 1 - b2 ** count.astype(jnp.float32)
  return jax.tree.map(lambda v: (eps + jnp.sqrt(v / bc)) / lr, nu)


def loss_aware_quantization(
    learning_rate: ScalarOrSchedule,
    *,
    bits: int = 1,
    level_set: str = "blaq",
    quantize: selection.Quantize = None,
    channel_axis: Optional[int] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_latent: Optional[float] = None,
    trial: bool = False,
    a: ScalarOrSchedule = 0.6,
    active: Active = 1,
    opaque: bool = True,
    batch_axis_name: Optional[str] = None,
    moments: str = "real",
    blend: str = "moments",
    diagnostics: bool = True,
    keep_trial: bool = False,
    tol: float = 1e-6,
    max_iter: int = 20,
) -> optax.GradientTransformationExtraArgs:
  """The one implementation behind :func:`laq` (``trial=False``) and :func:`blaq`.

  See :func:`blaq` for the arguments.
  """
  bits = check_bits(bits, "blaq" if level_set not in KINDS else level_set)
  if level_set not in KINDS:
    raise ValueError(f"Unknown level_set {level_set!r}; expected one of "
                     f"{KINDS}.")
  if moments not in ("real", "blended"):
    raise ValueError(f"moments must be 'real' or 'blended', got {moments!r}.")
  if blend not in BLENDS:
    raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}.")
  if trial and not opaque and blend == "gradients":
    raise ValueError("blend='gradients' needs the opaque mode (grad_fn).")
  _check_unit_interval("a", a)
  for name, value in (("b1", b1), ("b2", b2)):
    _check_unit_interval(name, value)
  if isinstance(active, bool) or not (
      callable(active) or (isinstance(active, (int, np.integer))
                           and active >= 1)):
    raise ValueError(
        "active must be a positive int period (1 = every step) or a callable "
        f"step -> bool, got {active!r}.")
  if clip_latent is not None and not clip_latent > 0:
    raise ValueError(f"clip_latent must be positive or None, got "
                     f"{clip_latent!r}.")
  who = "blaq" if trial else "laq"

  def layout(params):
    """Static per-leaf description: bit width (0 = full precision)."""
    selection.check_float_leaves(params, who)
    leaves, treedef = jax.tree.flatten(params)
    bl = selection.resolve_bits(params, quantize, bits, level_set)
    sets = [LevelSet(level_set, b) if b else None for b in bl]
    return leaves, treedef, sets

  def init_fn(params):
    leaves, treedef, sets = layout(params)
    qidx = [i for i, s in enumerate(sets) if s]

    def per_q(fn):
      return treedef.unflatten(
          [fn(p) if s else _MASK for p, s in zip(leaves, sets)])

    def quantize_leaf(p, s):
      alpha, codes = project(p, jnp.ones_like(p, jnp.float32), s,
                             channel_axis=channel_axis, tol=tol,
                             max_iter=max_iter)
      return QuantizedTensor(codes, alpha, s, channel_axis)

    del qidx
    zeros = jax.tree.map(jnp.zeros_like, params)
    return LossAwareState(
        count=jnp.zeros([], jnp.int32),
        mu=zeros,
        nu=jax.tree.map(jnp.zeros_like, params),
        latent=per_q(lambda p: jnp.array(p, copy=True)),
        quantized=selection.pure_structure(params).unflatten(
            [quantize_leaf(p, s) if s else _MASK
             for p, s in zip(leaves, sets)]),
        prev_update=per_q(jnp.zeros_like) if diagnostics else per_q(
            lambda p: _MASK),
        trial=TrialState(
            pending=jnp.zeros([], jnp.bool_),
            trial_latent=per_q(jnp.zeros_like) if keep_trial else per_q(
                lambda p: _MASK),
            trial_grad=per_q(jnp.zeros_like) if keep_trial else per_q(
                lambda p: _MASK)),
        diagnostics=init_diagnostics(),
        cost=make_cost(),
    )

  def update_fn(updates, state, params=None, *, grad_fn=None,
                curvature_fn=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(f"{who} needs params: call update(grads, state, "
                       "params).")
    leaves, treedef, sets = layout(params)
    selection.check_same_structure(params, updates, f"{who}: the gradient")
    if trial and opaque and grad_fn is None:
      raise ValueError(
          "blaq in opaque mode needs the keyword argument grad_fn: "
          "update(grads, state, params, grad_fn=fn) with fn(params) -> grads "
          "on the same minibatch (see blaq_jax.nnx_grad_fn for Flax NNX), "
          "or build it with blaq(..., opaque=False) for the transparent mode.")
    if curvature_fn is not None and trial and not opaque:
      raise ValueError("curvature_fn is supported in opaque mode only.")
    if trial and opaque:  # fail on every step, not just on active ones
      parallel.check_axis_bound(batch_axis_name, who)
    q_ix = [i for i, s in enumerate(sets) if s]
    n_q = int(sum(np.prod(leaves[i].shape) for i in q_ix))

    lr = learning_rate(state.count) if callable(learning_rate) else (
        learning_rate)
    a_t = a(state.count) if callable(a) else a
    g = [x.astype(jnp.float32) for x in _flat(treedef, updates)]
    mu = [x.astype(jnp.float32) for x in _flat(treedef, state.mu)]
    nu = [x.astype(jnp.float32) for x in _flat(treedef, state.nu)]
    latent = _flat(treedef, state.latent)
    qdef = selection.pure_structure(params)  # see pure_structure
    qts = _flat(qdef, state.quantized)
    prev = _flat(treedef, state.prev_update)
    for i in q_ix:
      if not isinstance(qts[i], QuantizedTensor) or qts[i].level_set != sets[i]:
        raise ValueError(
            f"{who}: the state does not match this optimizer's configuration "
            f"at leaf '{selection.path_str(jax.tree_util.tree_flatten_with_path(params)[0][i][0])}'"
            f" (state: {getattr(qts[i], 'level_set', qts[i])}, optimizer: "
            f"{sets[i]}); was it created by another config?")

    def bias_correction(t):
      t = t.astype(jnp.float32)
      return 1 - b1 ** t, 1 - b2 ** t

    def adam_moments(mu, nu, g):
      return ([b1 * m + (1 - b1) * x for m, x in zip(mu, g)],
              [b2 * v + (1 - b2) * x * x for v, x in zip(nu, g)])

    def denominators(nu, t, at_params):
      """``eta * D`` per leaf: ``eps + sqrt(v_hat)``, or ``eta * D_user``."""
      if curvature_fn is None:
        bc2 = bias_correction(t)[1]
        return [eps + jnp.sqrt(v / bc2) for v in nu]
      user = curvature_fn(at_params)
      selection.check_same_structure(params, user,
                                     f"{who}: curvature_fn's output")
      return [lr * x.astype(jnp.float32) for x in _flat(treedef, user)]

    def to_tree(xs, dtype_like=True):
      out = [x.astype(p.dtype) if dtype_like and not _is_node(x) else x
             for x, p in zip(xs, leaves)]
      return treedef.unflatten(out)

    def masked(xs):
      return [xs[i] if sets[i] else _MASK for i in range(len(leaves))]

    def proj(w, d, qt):
      alpha, codes = project(w, d, qt.level_set, channel_axis=channel_axis,
                             prev_codes=qt.codes, prev_alpha=qt.alpha,
                             tol=tol, max_iter=max_iter)
      return QuantizedTensor(codes, alpha, qt.level_set, qt.channel_axis)

    def finish(mu_new, nu_new, mhat, den, t, trial_diag):
      """Latent step ``w - eta * mhat / den``, projection, emitted updates."""
      ups, new_latent, new_qts, steps = [], list(latent), list(qts), []
      for i, p in enumerate(leaves):
        step = lr * mhat[i] / den[i]
        if not sets[i]:
          ups.append(-step.astype(p.dtype))
          continue
        w = latent[i].astype(jnp.float32) - step
        if clip_latent is not None:
          w = jnp.clip(w, -clip_latent, clip_latent)
        qt = proj(w, den[i], qts[i])
        steps.append(w - latent[i].astype(jnp.float32))
        new_latent[i] = w.astype(latent[i].dtype)
        new_qts[i] = qt
        ups.append(qt.dequantize(p.dtype) - p)
      prev_steps = [prev[i] for i in q_ix] if diagnostics else []
      diag = Diagnostics(
          flip_fraction=_fraction_changed(
              [new_qts[i].codes for i in q_ix], [qts[i].codes for i in q_ix],
              n_q),
          update_cosine=(_cosine(steps, prev_steps) if diagnostics
                         else jnp.zeros([], jnp.float32)),
          **trial_diag)
      new_prev = masked([None] * len(leaves))
      if diagnostics:
        for k, i in enumerate(q_ix):
          new_prev[i] = steps[k].astype(leaves[i].dtype)
      new_state = state._replace(
          count=t,
          mu=to_tree(mu_new), nu=to_tree(nu_new),
          latent=treedef.unflatten(new_latent),
          quantized=qdef.unflatten(new_qts),
          prev_update=treedef.unflatten(new_prev),
          trial=state.trial._replace(pending=jnp.zeros([], jnp.bool_)),
          diagnostics=diag,
          cost=make_cost(1 + diag.trial_active.astype(jnp.int32)))
      return to_tree(ups), new_state

    no_trial = dict(trial_active=jnp.zeros([], jnp.bool_),
                    trial_flip_fraction=jnp.zeros([], jnp.float32),
                    trial_grad_cosine=jnp.zeros([], jnp.float32))

    def real_moments(g):
      """Moments and corrected quantities of the real gradient at step t."""
      t = optax.safe_increment(state.count)
      mu_t, nu_t = adam_moments(mu, nu, g)
      bc1 = bias_correction(t)[0]
      mhat = [m / bc1 for m in mu_t]
      return t, mu_t, nu_t, mhat

    def laq_step(g):
      t, mu_t, nu_t, mhat = real_moments(g)
      den = denominators(nu_t, t, params)
      return finish(mu_t, nu_t, mhat, den, t, no_trial)

    def trial_latent(mhat, den):
      """``w* = w - eta mhat / D`` per quantized leaf (the LAQ step)."""
      out = {}
      for i in q_ix:
        w = latent[i].astype(jnp.float32) - lr * mhat[i] / den[i]
        if clip_latent is not None:
          w = jnp.clip(w, -clip_latent, clip_latent)
        out[i] = w
      return out

    def trial_point(mhat, den):
      """``w*`` and ``q* = proj_D(w*)`` per quantized leaf, and the params."""
      w_star = trial_latent(mhat, den)
      q_star = {i: proj(w_star[i], den[i], qts[i]) for i in q_ix}
      trial_params = treedef.unflatten([
          q_star[i].dequantize(p.dtype) if sets[i] else p
          for i, p in enumerate(leaves)])
      return w_star, q_star, trial_params

    def backtrack(t, mu_t, nu_t, mhat, den, g, g_star, w_star, q_star,
                  trial_params):
      """Stage 2: blend the trial moments into the real step."""
      g_star = [x.astype(jnp.float32) for x in g_star]
      mu_s, nu_s = adam_moments(mu_t, nu_t, g_star)
      t_s = optax.safe_increment(t)
      bc1_s = bias_correction(t_s)[0]
      den_s = denominators(nu_s, t_s, trial_params)
      mbar, dbar = list(mhat), list(den)
      mu_c, nu_c = list(mu_t), list(nu_t)
      for i in q_ix:
        if blend == "moments":
          mbar[i] = a_t * mhat[i] + (1 - a_t) * mu_s[i] / bc1_s
        elif blend == "lookahead":
          mbar[i] = a_t * mhat[i] + (1 - a_t) * g_star[i]
        else:
          mbar[i] = a_t * g[i] + (1 - a_t) * g_star[i]
        dbar[i] = a_t * den[i] + (1 - a_t) * den_s[i]
        if moments == "blended":
          mu_c[i] = a_t * mu_t[i] + (1 - a_t) * mu_s[i]
          nu_c[i] = a_t * nu_t[i] + (1 - a_t) * nu_s[i]
      diag = dict(
          trial_active=jnp.ones([], jnp.bool_),
          trial_flip_fraction=_fraction_changed(
              [q_star[i].codes for i in q_ix], [qts[i].codes for i in q_ix],
              n_q),
          trial_grad_cosine=_cosine([g[i] for i in q_ix],
                                    [g_star[i] for i in q_ix]))
      ups, new_state = finish(mu_c, nu_c, mbar, dbar, t, diag)
      if keep_trial:
        new_state = new_state._replace(trial=new_state.trial._replace(
            trial_latent=to_tree(masked(
                [w_star.get(i) for i in range(len(leaves))])),
            trial_grad=to_tree(masked(g_star))))
      return ups, new_state

    def blaq_opaque_step(g):
      t, mu_t, nu_t, mhat = real_moments(g)
      den = denominators(nu_t, t, params)
      w_star, q_star, trial_params = trial_point(mhat, den)
      g_star_tree = grad_fn(trial_params)
      selection.check_same_structure(params, g_star_tree,
                                     "blaq: the output of grad_fn")
      g_star_tree = parallel.pmean(g_star_tree, batch_axis_name, who=who)
      return backtrack(t, mu_t, nu_t, mhat, den, g,
                       _flat(treedef, g_star_tree), w_star, q_star,
                       trial_params)

    def gated(step_fn, g):
      """``step_fn`` on active steps, LAQ's step otherwise (lax.cond)."""
      if isinstance(active, (int, np.integer)):
        if active == 1:
          return step_fn(g)
        on = state.count % active == 0
      else:
        on = active(state.count)
        if isinstance(on, (bool, np.bool_)):
          return step_fn(g) if on else laq_step(g)
      return jax.lax.cond(jnp.asarray(on, jnp.bool_), step_fn, laq_step, g)

    if not trial:
      return laq_step(g)
    if opaque:
      return gated(blaq_opaque_step, g)

    # Transparent mode: an active step takes two calls. The first moves the
    # params to the trial point; the second brings the trial gradient.
    def start_trial(g):
      t, mu_t, nu_t, mhat = real_moments(g)
      den = denominators(nu_t, t, params)
      _, q_star, _ = trial_point(mhat, den)
      ups = [q_star[i].dequantize(p.dtype) - p if sets[i]
             else jnp.zeros_like(p) for i, p in enumerate(leaves)]
      diag = state.diagnostics._replace(
          trial_active=jnp.ones([], jnp.bool_),
          trial_flip_fraction=_fraction_changed(
              [q_star[i].codes for i in q_ix], [qts[i].codes for i in q_ix],
              n_q))
      return treedef.unflatten(ups), state._replace(
          mu=to_tree(mu_t), nu=to_tree(nu_t),
          trial=state.trial._replace(pending=jnp.ones([], jnp.bool_)),
          diagnostics=diag, cost=make_cost(1))

    def complete_trial(g_star):
      # mu/nu already hold m_t, v_t of the gradient at q_t (first call).
      t = optax.safe_increment(state.count)
      bc1 = bias_correction(t)[0]
      mhat = [m / bc1 for m in mu]
      den = denominators(nu, t, params)
      q_now = {i: qts[i] for i in q_ix}  # q* itself is not needed any more
      ups, new_state = backtrack(t, mu, nu, mhat, den, g_star, g_star,
                                 trial_latent(mhat, den), q_now, params)
      # The trial statistics were computed by the first call; the gradient
      # at q_t is gone by now, so the cosine to g* is not available.
      return ups, new_state._replace(diagnostics=new_state.diagnostics._replace(
          trial_flip_fraction=state.diagnostics.trial_flip_fraction,
          trial_grad_cosine=jnp.zeros([], jnp.float32)))

    return jax.lax.cond(state.trial.pending, complete_trial,
                        lambda g: gated(start_trial, g), g)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def laq(
    learning_rate: ScalarOrSchedule,
    *,
    bits: int = 1,
    level_set: str = "blaq",
    quantize: selection.Quantize = None,
    channel_axis: Optional[int] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_latent: Optional[float] = None,
    diagnostics: bool = True,
    tol: float = 1e-6,
    max_iter: int = 20,
) -> optax.GradientTransformationExtraArgs:
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
    quantize: which leaves are quantized and at how many bits; see
      :mod:`blaq_jax.selection` (default: dense/conv kernels).
    channel_axis: ``None`` for one scale per tensor; an axis (``-1`` for Flax
      kernels' output axis) for one scale per channel.
    b1, b2, eps: Adam's hyper-parameters (also for full-precision leaves).
    clip_latent: clip the latent weights to ``[-c, c]`` after each step
      (LAB's code uses 1); ``None`` to leave them unclipped.
    diagnostics: keep the last latent update for ``update_cosine`` (one more
      full-size buffer per quantized leaf).
    tol, max_iter: the projection's convergence tolerance and round cap.

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
  return loss_aware_quantization(
      learning_rate, bits=bits, level_set=level_set, quantize=quantize,
      channel_axis=channel_axis, b1=b1, b2=b2, eps=eps,
      clip_latent=clip_latent, trial=False, diagnostics=diagnostics, tol=tol,
      max_iter=max_iter)


def blaq(
    learning_rate: ScalarOrSchedule,
    *,
    bits: int = 1,
    a: ScalarOrSchedule = 0.6,
    active: Active = 1,
    level_set: str = "blaq",
    quantize: selection.Quantize = None,
    channel_axis: Optional[int] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_latent: Optional[float] = None,
    opaque: bool = True,
    batch_axis_name: Optional[str] = None,
    moments: str = "real",
    blend: str = "moments",
    diagnostics: bool = True,
    keep_trial: bool = False,
    tol: float = 1e-6,
    max_iter: int = 20,
) -> optax.GradientTransformationExtraArgs:
  """BLAQ: LAQ with a one-step-forward trial and backtrack (Ma et al. 2024).

  .. math::

    w^* = w_t - \\hat m_t / D_t,\\quad q^* = \\operatorname{proj}_{D_t}(w^*),
    \\quad g^* = \\nabla \\ell(q^*)

    \\bar m = a \\hat m_t + (1-a) \\hat m^*,\\quad
    \\bar D = a D_t + (1-a) D^*,\\quad
    w_{t+1} = w_t - \\bar m / \\bar D,\\quad
    q_{t+1} = \\operatorname{proj}_{\\bar D}(w_{t+1})

  where ``m* = b1 m_t + (1-b1) g*`` and ``v* = b2 v_t + (1-b2) g*^2`` are
  bias-corrected at ``t + 1``. With ``a = 1``, or on steps where ``active``
  is false, the update is exactly :func:`laq`'s. Theorem 2 of the paper:
  BLAQ converges faster than LAQ for ``2 / (L eta) - 1 < a < 1``.

  Args:
    learning_rate: float or Optax schedule.
    bits, level_set, quantize, channel_axis, b1, b2, eps, clip_latent,
      diagnostics, tol, max_iter: as in :func:`laq`.
    a: blend weight of the real step in ``[0, 1]`` (float or schedule of the
      step count). Paper: 0.6 (MNIST, SVHN, CIFAR-10), 0.9 (ImageNet).
    active: when to run the two-stage update: an int period in steps
      (``1`` = every step) or a callable ``step -> bool`` such as
      :func:`blaq_jax.one_epoch_every` (the paper's "one epoch out of every
      m"). On inactive steps no trial gradient is computed.
    opaque: ``True``: ``update(grads, state, params, *, grad_fn)`` calls
      ``grad_fn(trial_params) -> grads`` (same minibatch) inside the step.
      ``False`` (transparent): an active step takes two successive ``update``
      calls; the first moves the params to the trial point ``q*``, the second
      must be given the gradient there. A plain loop feeding a new minibatch
      each call then takes the trial gradient on the next minibatch, and a
      BatchNorm model updates its running statistics at the trial point too;
      use the opaque mode to follow the paper exactly.
    batch_axis_name: under ``pmap``/``shard_map``, the axis over which the
      trial gradient is averaged (``lax.pmean``), like the main gradient.
    moments: what the next step inherits: ``"real"`` (default; the moments
      of the real gradient, the trial is a look-ahead only) or ``"blended"``
      (``a m_t + (1-a) m*`` and likewise ``v``).
    blend: the reading of Algorithm 1 (``../shared/METHOD.md``) that forms
      the backtrack direction ``d`` in ``w_{t+1} = w_t - d / D_bar``:
      ``"moments"`` (default) ``a m_hat_t + (1-a) m_hat*``; ``"lookahead"``
      ``a m_hat_t + (1-a) g*``; ``"gradients"`` ``a g_t + (1-a) g*`` (no
      momentum on active steps; opaque mode only).
    keep_trial: also store ``w*`` and ``g*`` of the last active step in the
      state (two full-size buffers per quantized leaf).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blaq_jax
    >>> target = jnp.array([[0.3, -0.2], [0.25, -0.35]])
    >>> loss = lambda p: jnp.sum((p["kernel"] - target) ** 2)
    >>> params = {"kernel": jnp.array([[0.1, 0.1], [-0.1, 0.1]])}
    >>> opt = blaq_jax.blaq(0.05, a=0.6)
    >>> state = opt.init(params)
    >>> for _ in range(100):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = opt.update(grads, state, params,
    ...                               grad_fn=jax.grad(loss))
    ...   params = optax.apply_updates(params, updates)
    >>> jnp.sign(params["kernel"]).tolist()
    [[1.0, -1.0], [1.0, -1.0]]
  """
  return loss_aware_quantization(
      learning_rate, bits=bits, level_set=level_set, quantize=quantize,
      channel_axis=channel_axis, b1=b1, b2=b2, eps=eps,
      clip_latent=clip_latent, trial=True, a=a, active=active, opaque=opaque,
      batch_axis_name=batch_axis_name, moments=moments, blend=blend,
      diagnostics=diagnostics, keep_trial=keep_trial, tol=tol,
      max_iter=max_iter)
