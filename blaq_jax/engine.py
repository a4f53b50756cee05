"""The quantized-latent engine: one loop for every method that keeps latent weights.

Every quantizing method of blaq_jax (LAQ, BLAQ, the STE family, FOGZO, n-SPSA)
trains latent full-precision weights ``w`` while the model computes with
their quantized version ``q = alpha * beta``. Per step, with ``g`` the
gradient at ``q_t`` (what ``update`` receives):

.. math::

  g \\leftarrow \\operatorname{preprocess}(g),\\qquad
  (\\Delta, d) = \\operatorname{rule}(g, w_t, q_t, \\ldots),\\qquad
  w_{t+1} = \\operatorname{clip}(w_t + \\Delta),\\qquad
  q_{t+1} = \\operatorname{proj}_d(w_{t+1}),

and the transform emits ``updates = q_{t+1} - params``, so
``optax.apply_updates`` lands on the quantized weights (up to an ulp of the
subtraction; :func:`blaq_jax.quantized_params` is exact). Leaves trained in
full precision take ``params + Delta``. The engine does everything but the
rule: leaf selection, the latent weights, codes and scales, the projection,
the emitted update, state and argument checks, non-finite guarding, opt-in
diagnostics and the cost record. A method (:class:`Rule`) brings only how
the latent step ``Delta`` and the projection weight ``d`` are formed (and
may evaluate the gradient at other points, as BLAQ's trial does).

**Non-finite gradients.** If the gradient given to ``update`` (after
``preprocess``) or one the rule evaluates (BLAQ's trial gradient, FOGZO's
estimate) holds a NaN or an inf, the step is skipped: the updates are zero
and the state is unchanged except for ``skipped_steps`` (read it with
``optax.tree.get(state, "skipped_steps")``) and ``cost``.

**Must be last in a chain.** The emitted update is ``q_{t+1} - params``: a
transform after it moves the params off the level set.
:func:`check_on_level_set` tells. Gradient transforms the user wants before
the quantizer (clipping, ...) go in ``preprocess``, which also reaches the
gradients the rule evaluates itself (BLAQ's trial gradient).

Example:
  >>> import jax, jax.numpy as jnp, optax, blaq_jax
  >>> params = {"kernel": jnp.array([[0.5, -0.2], [0.1, 0.4]])}
  >>> opt = blaq_jax.laq(0.01, preprocess=optax.clip_by_global_norm(1.0))
  >>> state = opt.init(params)
  >>> params = blaq_jax.quantized_params(params, state)  # start on the set
  >>> grads = {"kernel": jnp.array([[jnp.nan, 0.0], [0.0, 0.0]])}
  >>> updates, state = opt.update(grads, state, params)
  >>> int(optax.tree.get(state, "skipped_steps")), float(jnp.abs(
  ...     updates["kernel"]).max())
  (1, 0.0)
  >>> blaq_jax.check_on_level_set(params, state)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blaq_jax import parallel
from blaq_jax import selection
from blaq_jax.state import (Diagnostics, QuantizedTensor, StepCost, cosine,
                            fraction_changed, init_diagnostics, make_cost)

MASK = optax.MaskedNode()


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of the params a state was made for (no array leaves).

  It lets ``update`` name the leaf whose structure, shape or dtype changed.
  """

  paths: tuple
  shapes: tuple
  level_sets: tuple


jax.tree_util.register_dataclass(
    Layout, data_fields=[], meta_fields=["paths", "shapes", "level_sets"])


class DiagnosticsState(NamedTuple):
  """Opt-in diagnostics (``diagnostics=True``).

  Attributes:
    stats: :class:`~blaq_jax.state.Diagnostics` of the last step.
    prev_update: the last latent update of quantized leaves.
  """

  stats: Diagnostics
  prev_update: Any


class QuantizedLatentState(NamedTuple):
  """State of every quantizing transform of blaq_jax.

  Attributes:
    count: number of completed steps, int32.
    latent: latent full-precision weights ``w`` (MaskedNode at leaves trained
      in full precision).
    quantized: :class:`~blaq_jax.state.QuantizedTensor` of ``q_t`` at
      quantized leaves (MaskedNode elsewhere).
    rule: the method's own state (Adam moments for LAQ/BLAQ, the inner
      optimizer's state for the STE family, ...).
    preprocess: state of the ``preprocess`` transform.
    skipped_steps: steps skipped because a gradient was not finite, int32.
    cost: :class:`~blaq_jax.state.StepCost` of the last step.
    diagnostics: :class:`DiagnosticsState` with ``diagnostics=True``, else
      ``optax.EmptyState()``.
    layout: :class:`Layout` (static).
  """

  count: jax.Array
  latent: Any
  quantized: Any
  rule: Any
  preprocess: Any
  skipped_steps: jax.Array
  cost: StepCost
  diagnostics: Any
  layout: Layout


class Step(NamedTuple):
  """What a rule's step returns (lists run over all leaves, in order).

  Attributes:
    latent: the new latent weights (float32; params at full-precision
      leaves).
    weight: the projection weights ``d`` (None: the rule's own projector
      needs none, or at full-precision leaves).
    rule: the rule's new state.
    finite: whether every gradient the rule evaluated was finite.
    commit: False when the step only visits a point (BLAQ's transparent
      trial): the emitted update goes there, the state keeps ``w_t, q_t``.
    gradients: gradients used, the one given to ``update`` included.
    losses: extra loss evaluations.
    trial: BLAQ's trial diagnostics as a dict (or None).
    guarded: the rule already kept its state where ``ctx.finite`` or its
      own ``finite`` is False; the engine then does not select the state
      again (which reads the old state after the new one overwrote it in
      place, and makes XLA copy the donated buffers).
  """

  latent: list
  weight: Optional[list]
  rule: Any
  finite: Any = True
  commit: Any = True
  gradients: Any = 1
  losses: Any = 0
  trial: Optional[dict] = None
  guarded: bool = False


class Context(NamedTuple):
  """What the engine gives a rule's ``step`` (one ``update`` call).

  Attributes:
    count: the state's step count.
    grads: float32 gradients of every leaf (after ``preprocess``).
    latent: float32 latent weights (params at full-precision leaves).
    quantized: :class:`QuantizedTensor` per leaf (None at full precision).
    is_quantized: bool per leaf.
    params: the params given to ``update``.
    extra_args: ``update``'s extra keyword arguments.
    diagnostics: whether the diagnostics are on.
    last_stats: the :class:`~blaq_jax.state.Diagnostics` of the last step
      (None when the diagnostics are off).
    project: ``(latent list, weight list or None) -> list`` of
      :class:`QuantizedTensor` (None at full-precision leaves).
    params_at: ``quantized list -> params`` tree at those quantized leaves.
    gradient: ``params -> (float32 list, all finite)``: ``grad_fn(params)``
      averaged over ``batch_axis_name`` and preprocessed like the main one.
    finite: whether ``grads`` are all finite. A rule may guard its state
      with it early (the engine guards the whole state again; guarding and
      materialising the moments before the latent step saves XLA copies).
  """

  count: jax.Array
  grads: list
  latent: list
  quantized: list
  is_quantized: list
  params: Any
  extra_args: dict
  diagnostics: bool
  last_stats: Any
  project: Callable
  params_at: Callable
  gradient: Callable
  finite: Any


class Rule(NamedTuple):
  """A method for the engine.

  Attributes:
    init: ``(params, [is the leaf quantized]) -> rule state``.
    step: ``(Context, rule state) -> Step``.
    project: ``(w, weight, level_set, previous QuantizedTensor or None, *,
      channel_axis, tol, max_iter) -> (alpha, codes)``, one quantized leaf.
    needs: names of ``update``'s extra keyword arguments the rule needs.
    fixed_rounds: by default, project 2-bit leaves with 2 fixed rounds (the
      error measured for LAQ's D-weighted projection); False: converge.
  """

  init: Callable
  step: Callable
  project: Callable
  needs: tuple = ()
  fixed_rounds: bool = False


# Options every quantizing method takes, with their defaults.
OPTIONS = dict(quantize=None, channel_axis=None, clip_latent=None,
               preprocess=None, diagnostics=False, batch_axis_name=None,
               tol=None, max_iter=None)


def with_options(**overrides):
  """Gives a method factory the engine's options as keyword-only arguments.

  The factory takes its own arguments and ``**options``; its signature (what
  ``inspect``, ``optax.inject_hyperparams`` and the docs see) lists both, so
  the options are written once, here. ``overrides`` change a default, add
  an option, or (value ``DROP``) remove one: ``bc`` has no
  ``channel_axis``.
  """
  defaults = dict(OPTIONS)
  for k, v in overrides.items():
    if v is DROP:
      defaults.pop(k)
    else:
      defaults[k] = v

  def wrap(factory):
    sig = inspect.signature(factory)
    own = [p for p in sig.parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
             for k, v in defaults.items()]
    factory.__signature__ = sig.replace(parameters=own + extra)
    allowed = set(defaults)

    def call(*args, **kwargs):
      bad = set(kwargs) - allowed - set(sig.parameters)
      if bad:
        raise TypeError(f"{factory.__name__}() got unexpected keyword "
                        f"argument(s) {sorted(bad)}.")
      opts = {k: kwargs.pop(k, v) for k, v in defaults.items()}
      return factory(*args, **kwargs, **opts)

    call.__signature__ = factory.__signature__
    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
      setattr(call, attr, getattr(factory, attr))
    call.__wrapped_factory__ = factory
    return call

  return wrap


DROP = object()


def check_unit_interval(name, value):
  """Raises ValueError unless a static ``value`` is a scalar in [0, 1]."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return
  v = np.asarray(value)
  if v.shape != () or not 0.0 <= float(v) <= 1.0:
    raise ValueError(f"{name} must be a scalar in [0, 1], got {value!r}.")


def check_active(active):
  """Raises ValueError unless ``active`` is a period >= 1 or a callable."""
  if isinstance(active, (bool, np.bool_)) or not (
      callable(active) or isinstance(active, (jax.Array, jax.core.Tracer))
      or (isinstance(active, (int, np.integer)) and active >= 1)):
    raise ValueError(
        "active must be a positive int period (1 = every step) or a callable "
        f"step -> bool, got {active!r}.")


def is_active(active, count):
  """Whether a method's optional stage runs at step ``count``: True, False,
  or a traced bool (then the method selects with ``lax.cond``)."""
  if callable(active):
    on = active(count)
    return bool(on) if isinstance(on, (bool, np.bool_)) else jnp.asarray(
        on, jnp.bool_)
  if isinstance(active, (int, np.integer)) and active == 1:
    return True
  return count % active == 0


def select(on, if_on: Callable, if_off: Callable, x):
  """``if_on(x)`` or ``if_off(x)`` for an :func:`is_active` value: a Python
  bool picks at trace time, a traced one with ``lax.cond`` (only the branch
  taken runs)."""
  if on is True or on is False:
    return if_on(x) if on else if_off(x)
  return jax.lax.cond(on, if_on, if_off, x)


def quantized_latent(rule: Rule, level_sets: Callable[[Any], list], *,
                     who: str, quantize=None, channel_axis=None,
                     clip_latent=None, preprocess=None, diagnostics=False,
                     batch_axis_name=None, tol=1e-6, max_iter=20):
  """The transform of a :class:`Rule` (the methods' common loop, module doc).

  Args:
    rule: the method.
    level_sets: ``(params, quantize) -> [LevelSet or None per leaf]``.
    who: the method's name, used in error messages.
    quantize: which leaves are quantized (:mod:`blaq_jax.selection`).
    channel_axis: ``None`` (one scale per tensor) or the scaled axis.
    clip_latent: clip the latent weights to ``[-c, c]`` after each step.
    preprocess: an ``optax.GradientTransformation`` applied to the gradient
      given to ``update`` and to every gradient the rule evaluates (BLAQ's
      trial gradient, with the state of the main call), e.g.
      ``optax.clip_by_global_norm(1.0)``.
    diagnostics: keep :class:`~blaq_jax.state.Diagnostics` (flip fraction,
      update cosine, trial statistics) and the last latent update.
    batch_axis_name: under ``pmap``/``shard_map``, the data-parallel axis
      over which the gradients the rule evaluates are averaged.
    tol, max_iter: the multi-bit projection (1 bit is exact in one pass).
      ``tol=None``: ``max_iter`` alternation rounds per step, warm-started
      from the last scale, with no data-dependent loop. ``tol > 0``: rounds
      until the scale moves less than ``tol`` (cap ``max_iter``, default
      20), the fixed point of the alternation. Default (both None): LAQ and
      BLAQ take 2 fixed rounds at 2 bits (mean excess D-weighted error 2e-7,
      max 1.1e-5 over an MNIST trajectory,
      ``experiments/results/projection_error.md``); above 2 bits (3 rounds
      would leave up to 1e-3), in the STE family's scale rules and at
      ``init`` the rounds run to ``tol = 1e-6``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  if clip_latent is not None and not (
      isinstance(clip_latent, jax.core.Tracer) or (
          np.ndim(clip_latent) == 0 and float(clip_latent) > 0)):
    raise ValueError(f"{who}: clip_latent must be positive or None, got "
                     f"{clip_latent!r}.")
  if preprocess is not None and not hasattr(preprocess, "update"):
    raise TypeError(f"{who}: preprocess must be an optax "
                    f"GradientTransformation, got {preprocess!r}.")
  pre = optax.with_extra_args_support(
      optax.identity() if preprocess is None else preprocess)

  def layout_of(params):
    selection.check_float_leaves(params, who)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    sets = tuple(level_sets(params, quantize))
    return Layout(tuple(selection.path_str(p) for p, _ in flat),
                  tuple((tuple(jnp.shape(x)), str(jnp.result_type(x)))
                        for _, x in flat), sets)

  def qt_of(alpha_codes, s):
    return QuantizedTensor(alpha_codes[1], alpha_codes[0], s, channel_axis)

  def proj(w, d, s, prev):
    t, rounds = tol, max_iter
    if prev is None or (tol is None and max_iter is None and (
        s.bits > 2 or not rule.fixed_rounds)):
      t, rounds = 1e-6, 20  # init, and by default above 2 bits: converge
    elif rounds is None:
      rounds = 2 if tol is None else 20
    return qt_of(rule.project(w, d, s, prev, channel_axis=channel_axis,
                              tol=t, max_iter=rounds), s)

  def init_fn(params):
    layout = layout_of(params)
    leaves, treedef = jax.tree.flatten(params)
    sets = layout.level_sets
    qts = [proj(jnp.asarray(p, jnp.float32), None, s, None) if s else MASK for p, s in zip(leaves, sets)]
    per_q = lambda fn: treedef.unflatten(  # noqa: E731
        [fn(p) if s else MASK for p, s in zip(leaves, sets)])
    diag = (DiagnosticsState(init_diagnostics(), per_q(jnp.zeros_like))
            if diagnostics else optax.EmptyState())
    return QuantizedLatentState(
        count=jnp.zeros([], jnp.int32),
        latent=per_q(lambda p: jnp.array(p, copy=True)),
        quantized=selection.pure_structure(params).unflatten(qts),
        rule=rule.init(params, [bool(s) for s in sets]),
        preprocess=pre.init(params),
        skipped_steps=jnp.zeros([], jnp.int32),
        cost=make_cost(),
        diagnostics=diag,
        layout=layout)

  def check(state, params, grads):
    if not isinstance(state, QuantizedLatentState):
      fields = getattr(state, "_fields", ())
      old = ("mu" in fields or "inner" in fields) and "latent" in fields
      raise ValueError(
          f"{who}: the optimizer state is a {type(state).__name__}, not a "
          "QuantizedLatentState" + (
              ": it has the layout of blaq_jax 0.1 (LossAwareState/STEState),"
              " which this version cannot read. Create the state anew with "
              "init() (a checkpoint of the old layout cannot be resumed)."
              if old else "; was it created by another optimizer?"))
    layout = layout_of(params)
    old = state.layout
    if old.paths != layout.paths:
      raise ValueError(
          f"{who}: params do not match the optimizer state: leaves only in "
          f"params: {sorted(set(layout.paths) - set(old.paths))}, only in "
          f"the state: {sorted(set(old.paths) - set(layout.paths))}.")
    for path, a, b, sa, sb in zip(layout.paths, old.shapes, layout.shapes,
                                  old.level_sets, layout.level_sets):
      if a != b:
        raise ValueError(
            f"{who}: leaf '{path}' has shape {b[0]} and dtype {b[1]}, but the "
            f"optimizer state was made for shape {a[0]} and dtype {a[1]}.")
      if sa != sb:
        raise ValueError(
            f"{who}: the state does not match this optimizer's "
            f"configuration at leaf '{path}' (state: {sa}, optimizer: {sb});"
            " was it created by another config?")
    selection.check_same_structure(params, grads, f"{who}: the gradient")
    for path, (shape, _), g in zip(layout.paths, layout.shapes,
                                   jax.tree.leaves(grads)):
      if tuple(jnp.shape(g)) != shape:
        raise ValueError(f"{who}: the gradient of leaf '{path}' has shape "
                         f"{jnp.shape(g)}, the params {shape}.")

  def all_finite(xs):
    # x - x is nan at inf and nan, else 0, and a sum of zeros cannot
    # overflow: one fused reduction per leaf, no boolean array written.
    return jnp.isfinite(sum((jnp.sum(x - x) for x in xs), jnp.float32(0)))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{who} needs params: call update(grads, state, "
                       "params).")
    check(state, params, updates)
    for name in rule.needs:
      if extra_args.get(name) is None:
        raise ValueError(NEEDS_MESSAGES[name].format(who=who))
    if rule.needs:
      parallel.check_axis_bound(batch_axis_name, who)
    leaves, treedef = jax.tree.flatten(params)
    qdef = selection.pure_structure(params)
    sets = state.layout.level_sets
    pre_updates, pre_state = pre.update(updates, state.preprocess, params,
                                        **extra_args)
    g = [x.astype(jnp.float32) for x in treedef.flatten_up_to(pre_updates)]
    latent_in = treedef.flatten_up_to(state.latent)
    qts = qdef.flatten_up_to(state.quantized)
    latent = [(w if s else p).astype(jnp.float32)
              for w, p, s in zip(latent_in, leaves, sets)]
    q_or_none = [qt if s else None for qt, s in zip(qts, sets)]

    def project(ws, weights):
      out = []
      for i, (w, s) in enumerate(zip(ws, sets)):
        if not s:
          out.append(None)
          continue
        d = None if weights is None else weights[i]
        out.append(proj(w, d, s, qts[i]))
      return out

    def params_at(quantized):
      return treedef.unflatten([
          q.dequantize(p.dtype) if s else p
          for q, p, s in zip(quantized, leaves, sets)])

    def gradient(at):
      fn = extra_args["grad_fn"]
      out = fn(at)
      selection.check_same_structure(params, out,
                                     f"{who}: the output of grad_fn")
      out = parallel.pmean(out, batch_axis_name, who=who)
      out, _ = pre.update(out, state.preprocess, at, **extra_args)
      out = [x.astype(jnp.float32) for x in treedef.flatten_up_to(out)]
      return out, all_finite(out)

    finite = all_finite(g)
    ctx = Context(state.count, g, latent, q_or_none, [bool(x) for x in sets],
                  params, extra_args, diagnostics,
                  state.diagnostics.stats if diagnostics else None,
                  project, params_at, gradient, finite)
    step = rule.step(ctx, state.rule)
    ok = jnp.logical_and(finite, step.finite)
    q_ix = [i for i, s in enumerate(sets) if s]
    stepped = list(step.latent)
    if clip_latent is not None:
      for i in q_ix:
        stepped[i] = jnp.clip(stepped[i], -clip_latent, clip_latent)
    # A skipped step keeps every stored value. The guarded latent weights and
    # rule state are materialised once (the barrier): the projection's sums
    # and the emitted update then read them, instead of XLA recomputing the
    # step (and copying the donated buffers it overwrites) in each consumer.
    guarded = [jnp.where(ok, stepped[i], latent[i]) for i in q_ix]
    rule_state = step.rule if step.guarded else (
        optax.tree.where(ok, step.rule, state.rule))
    guarded, rule_state = jax.lax.optimization_barrier((guarded, rule_state))
    weights = step.weight(rule_state) if callable(step.weight) else (
        step.weight)
    new_qts = project([guarded[q_ix.index(i)] if s else None
                       for i, s in enumerate(sets)], weights)
    keep = ok if step.commit is True else jnp.logical_and(ok, step.commit)
    stored = [optax.tree.where(keep, new_qts[i], qts[i]) if s else qts[i]
              for i, s in enumerate(sets)]
    if step.commit is True:
      # The emitted update reads the stored codes (1 byte per entry) rather
      # than recomputing them from the latent weights.
      stored = jax.lax.optimization_barrier(stored)
      new_qts = stored
    new_latent, ups = list(latent_in), []
    for i, p in enumerate(leaves):
      if not sets[i]:
        ups.append(jnp.where(ok, stepped[i] - latent[i], 0).astype(p.dtype))
        continue
      ups.append(jnp.where(ok, new_qts[i].dequantize(p.dtype) - p, 0))
      new_latent[i] = guarded[q_ix.index(i)].astype(latent_in[i].dtype)
    diag = state.diagnostics
    if diagnostics:
      prev = treedef.flatten_up_to(diag.prev_update)
      deltas = [guarded[k] - latent[i] for k, i in enumerate(q_ix)]
      n_q = int(sum(np.prod(leaves[i].shape) for i in q_ix))
      stats = init_diagnostics()._replace(
          flip_fraction=fraction_changed([new_qts[i].codes for i in q_ix],
                                         [qts[i].codes for i in q_ix], n_q),
          update_cosine=cosine(deltas, [prev[i] for i in q_ix]),
          **(step.trial or {}))
      new_prev = list(prev)
      for k, i in enumerate(q_ix):
        new_prev[i] = deltas[k].astype(leaves[i].dtype)
      diag = optax.tree.where(ok, DiagnosticsState(
          stats, treedef.unflatten(new_prev)), diag)
    new_state = state._replace(
        count=jnp.where(keep, optax.safe_increment(state.count), state.count),
        latent=(treedef.unflatten(new_latent) if step.commit is True else
                optax.tree.where(step.commit, treedef.unflatten(new_latent),
                                 state.latent)),
        quantized=qdef.unflatten(stored),
        rule=rule_state,
        preprocess=optax.tree.where(ok, pre_state, state.preprocess),
        skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32),
        cost=make_cost(step.gradients, step.losses),
        diagnostics=diag)
    return treedef.unflatten(ups), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


NEEDS_MESSAGES = {
    "grad_fn": (
        "{who} needs the keyword argument grad_fn: update(grads, state, "
        "params, grad_fn=fn) with fn(params) -> grads on the same minibatch "
        "(see blaq_jax.nnx_grad_fn for Flax NNX), or build it with "
        "blaq(..., opaque=False) for the transparent mode."),
    "loss_fn": (
        "{who} needs the keyword argument loss_fn: update(grads, state, "
        "params, loss_fn=fn) with fn(params) -> scalar, the loss on the "
        "same minibatch as grads (two extra forward passes per direction)."),
}


def check_on_level_set(params, opt_state, *, ulps: float = 4.0) -> None:
  """Raises ValueError unless ``params`` are the state's quantized weights.

  Cheap (one comparison per quantized leaf, outside ``jit``). Fails when a
  transform after the quantizer in a chain moved the params off the level
  set, or when the params and the state come from different runs. The
  emitted ``q - params`` lands within a few ulps of ``q``; ``ulps`` is that
  tolerance, relative to ``|q|``.

  Example:
    >>> import jax.numpy as jnp, optax, blaq_jax
    >>> params = {"kernel": jnp.array([[0.3, -0.1], [0.2, -0.4]])}
    >>> state = blaq_jax.laq(1e-3).init(params)
    >>> blaq_jax.check_on_level_set(params, state)
    Traceback (most recent call last):
    ...
    ValueError: params leaf 'kernel' is off the optimizer's level set by up to 0.15 ...
  """
  from blaq_jax.state import quantized_tensors  # pylint: disable=g-import-not-at-top
  qt = selection.pure_structure(params).flatten_up_to(
      quantized_tensors(opt_state))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, p), t in zip(flat, qt):
    if not isinstance(t, QuantizedTensor):
      continue
    q = np.asarray(t.dequantize(jnp.float32))
    p = np.asarray(p, np.float32)
    tol = ulps * np.finfo(np.float32).eps * np.maximum(np.abs(q), 1e-30)
    err = np.abs(p - q)
    if not np.all(err <= tol):
      raise ValueError(
          f"params leaf '{selection.path_str(path)}' is off the optimizer's "
          f"level set by up to {float(err.max()):.3g} (expected alpha * beta"
          " of the state). Is a transform chained after the quantizer? It "
          "must be the last one; put gradient transforms in its preprocess "
          "argument. Or do params and state come from different runs?")
