"""The quantized-latent engine: one loop for every method that keeps latent weights.

A method (:class:`Rule`) brings how its latent step and projection weight are
formed; :func:`quantized_latent` does the rest. The contract (the step's math,
``preprocess``, non-finite steps skipped, last in a chain) is in
``docs/methods.rst``, section "What every method keeps".

Example:
  >>> import jax.numpy as jnp, optax, blaq_jax
  >>> params = {"kernel": jnp.array([[0.5, -0.2], [0.1, 0.4]])}
  >>> opt = blaq_jax.laq(0.01, preprocess=optax.clip_by_global_norm(1.0))
  >>> state = opt.init(params)
  >>> params = blaq_jax.quantized_params(params, state)  # start on the set
  >>> grads = {"kernel": jnp.array([[jnp.nan, 0.0], [0.0, 0.0]])}
  >>> updates, state = opt.update(grads, state, params)  # skipped, counted
  >>> int(optax.tree.get(state, "skipped_steps")), float(jnp.abs(
  ...     updates["kernel"]).max())
  (1, 0.0)
  >>> blaq_jax.check_on_level_set(params, state)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blaq_jax import parallel
from blaq_jax import selection
from blaq_jax.state import (MASK, DiagnosticsState, Layout, LeafScale,
                            QuantizedLatentState, check_state, cosine,
                            fraction_changed, init_diagnostics, make_cost)


class Step(NamedTuple):
  """What a rule's step returns (lists run over all leaves, in order).

  Attributes:
    latent: the new float32 latent weights (params at full-precision leaves).
    weight: the projection weights ``d``, None, or ``rule state -> weights``.
    rule: the rule's new state.
    finite: whether every gradient the rule evaluated was finite.
    commit: False when the step only visits a point (BLAQ's transparent
      trial): the emitted update goes there, the state keeps ``w_t, q_t``.
    gradients, losses: gradient and extra loss evaluations of the step.
    trial: BLAQ's trial diagnostics as a dict (or None).
    guarded: the rule already kept its state where a gradient is not finite;
      the engine does not select it again (XLA would copy donated buffers).
    start: None, or per leaf a scale nearer to the new one than the last
      step's (BLAQ's trial point ``q*``, one step from ``w_t`` like
      ``w_{t+1}``): a projection in fixed rounds starts there and runs one
      round fewer (at least one), continuing the rounds that scale came
      from. Converging projections ignore it.
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
  start: Optional[list] = None


class Context(NamedTuple):
  """What the engine gives a rule's ``step`` (one ``update`` call).

  Attributes:
    count, params, extra_args: the state's count, ``update``'s params and
      extra keyword arguments.
    grads, latent: float32 gradients (after ``preprocess``) and latent
      weights (params at full-precision leaves) of every leaf.
    quantized, is_quantized: :class:`~blaq_jax.state.QuantizedTensor`
      (None at full precision) and bool per leaf.
    diagnostics, last_stats: whether the diagnostics are on; the last
      step's :class:`~blaq_jax.state.Diagnostics` (None when off).
    project: ``(latent list, weight list or None, rounds=None) ->
      LeafScale list`` (None at full precision): the projection of those
      latent weights; ``rounds`` replaces the number of rounds where the
      projection runs fixed rounds (BLAQ's trial point). A latent may be a
      callable, formed in each pass (:func:`~blaq_jax.projection.project`).
    params_at: ``(latent list, LeafScale list) -> params``: ``alpha * beta``
      at the quantized leaves.
    gradient: ``params -> (float32 list, all finite)``: ``grad_fn(params)``
      averaged over ``batch_axis_name`` and preprocessed like ``grads``.
    finite: whether ``grads`` are all finite (a rule may guard with it).
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
      channel_axis, tol, max_iter) -> (alpha, unit)``, one quantized leaf:
      the codes are ``projection.encode(w, alpha, level_set, channel_axis,
      unit)`` (``unit``: None, or TWN's).
    needs: names of ``update``'s extra keyword arguments the rule needs.
    fixed_rounds: by default project 2-bit leaves in 2 fixed rounds (else
      until converged).
  """

  init: Callable
  step: Callable
  project: Callable
  needs: tuple = ()
  fixed_rounds: bool = False


def all_finite(xs):
  """Whether every entry of the arrays ``xs`` is finite (a scalar bool).

  ``x - x`` is nan at inf and nan, else 0, and a sum of zeros cannot
  overflow: one fused reduction per array, no boolean array written.
  """
  return jnp.isfinite(sum((jnp.sum(x - x) for x in xs), jnp.float32(0)))


def quantized_latent(rule: Rule, level_sets: Callable[[Any], list], *,
                     who: str, quantize=None, channel_axis=None,
                     clip_latent=None, preprocess=None, diagnostics=False,
                     batch_axis_name=None, tol=1e-6, max_iter=20):
  """The transform of a :class:`Rule`: the loop every method shares.

  Args:
    rule: the method.
    level_sets: ``(params, quantize) -> [LevelSet or None per leaf]``.
    who: the method's name, used in error messages.
    quantize: which leaves are quantized (:mod:`blaq_jax.selection`).
    channel_axis: ``None`` (one scale per tensor) or the scaled axis.
    clip_latent: clip the latent weights to ``[-c, c]`` after each step.
    preprocess: an ``optax.GradientTransformation`` (e.g. clipping) applied
      to the gradient given to ``update`` and to every gradient the rule
      evaluates (BLAQ's trial gradient, with the state of the main call).
    diagnostics: keep :class:`~blaq_jax.state.Diagnostics` (flip fraction,
      update cosine, trial statistics) and the last latent update.
    batch_axis_name: under ``pmap``/``shard_map``, the data-parallel axis
      over which the gradients the rule evaluates are averaged.
    tol, max_iter: the multi-bit projection (1 bit is exact). ``tol=None``:
      ``max_iter`` rounds warm-started from the last scale (or one fewer
      from a nearer one a rule gives, ``Step.start``), no data-dependent
      loop; ``tol > 0``: rounds until the scale moves less than ``tol`` (cap
      ``max_iter``, default 20). Default (both None): 2 fixed rounds at 2
      bits; above 2 bits and at ``init``, rounds to ``tol = 1e-6``
      (:doc:`/performance`, "k bits", gives their errors).

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
    return Layout.of(params, level_sets(params, quantize))

  def rounds_of(s, first):
    """``(tol, max_iter)`` of a leaf's projection (``first``: at init)."""
    if first or (tol is None and max_iter is None and (
        s.bits > 2 or not rule.fixed_rounds)):
      return 1e-6, 20  # init, and by default above 2 bits: converge
    return tol, (2 if tol is None else 20) if max_iter is None else max_iter

  def proj(w, d, s, prev, rounds=None, start=None):
    t, n = rounds_of(s, prev is None)
    if t is None and rounds is not None:  # the count of fixed rounds
      n = rounds
    more = {}
    if t is None and start is not None:  # Step.start
      more, n = dict(start_alpha=start), max(1, n - 1)
    alpha, unit = rule.project(w, d, s, prev, channel_axis=channel_axis,
                               tol=t, max_iter=n, **more)
    return LeafScale(alpha, unit, level_set=s, channel_axis=channel_axis)

  def to_store(sc, w, s):
    # The diagnostics' flip count and a converging multi-bit projection read
    # the last codes: they are stored, since derived from the old latent
    # weights they would be read after the step overwrote them (XLA then
    # copies the weights).
    if diagnostics or (s.bits > 1 and rounds_of(s, False)[0] is not None):
      return dataclasses.replace(sc, codes=sc.at(w).codes)
    return sc

  def init_fn(params):
    layout = layout_of(params)
    leaves, treedef = jax.tree.flatten(params)
    per_q = lambda fn: [fn(p, s) if s else MASK  # noqa: E731
                        for p, s in zip(leaves, layout.level_sets)]
    diag = DiagnosticsState(init_diagnostics(), treedef.unflatten(
        per_q(lambda p, s: jnp.zeros_like(p)))) if diagnostics else (
            optax.EmptyState())
    return QuantizedLatentState(
        count=jnp.zeros([], jnp.int32),
        latent=treedef.unflatten(per_q(lambda p, s: jnp.array(p, copy=True))),
        quantized=selection.pure_structure(params).unflatten(per_q(
            lambda p, s: to_store(proj(jnp.asarray(p, jnp.float32), None, s,
                                       None), p, s))),
        rule=rule.init(params, [bool(s) for s in layout.level_sets]),
        preprocess=pre.init(params), skipped_steps=jnp.zeros([], jnp.int32),
        cost=make_cost(), diagnostics=diag, layout=layout)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{who} needs params: call update(grads, state, "
                       "params).")
    check_state(state, layout_of(params), params, updates, who)
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
    scales = qdef.flatten_up_to(state.quantized)
    latent = [(w if s else p).astype(jnp.float32)
              for w, p, s in zip(latent_in, leaves, sets)]
    old = [sc.at(w) if s else None for sc, w, s in zip(scales, latent, sets)]

    def scales_of(ws, weights, rounds=None, start=None):
      return [proj(w, None if weights is None else weights[i], s, old[i],
                   rounds, None if start is None else start[i]) if s else None
              for i, (w, s) in enumerate(zip(ws, sets))]

    def params_at(ws, scales):
      return treedef.unflatten([sc.dequantize(w, p.dtype) if s else p
                                for w, sc, p, s in zip(ws, scales, leaves,
                                                       sets)])

    def gradient(at):
      out = extra_args["grad_fn"](at)
      selection.check_same_structure(params, out,
                                     f"{who}: the output of grad_fn")
      out, _ = pre.update(parallel.pmean(out, batch_axis_name, who=who),
                          state.preprocess, at, **extra_args)
      out = [x.astype(jnp.float32) for x in treedef.flatten_up_to(out)]
      return out, all_finite(out)

    finite = all_finite(g)
    ctx = Context(state.count, g, latent, old, [bool(x) for x in sets],
                  params, extra_args, diagnostics,
                  state.diagnostics.stats if diagnostics else None,
                  scales_of, params_at, gradient, finite)
    step = rule.step(ctx, state.rule)
    ok = jnp.logical_and(finite, step.finite)
    q_ix = [i for i, s in enumerate(sets) if s]
    stepped = [jnp.clip(w, -clip_latent, clip_latent)
               if s and clip_latent is not None else w
               for w, s in zip(step.latent, sets)]
    # A skipped step keeps every stored value. The guarded latent weights and
    # rule state are materialised once (the barrier): the projection's sums
    # and the emitted update then read them, instead of XLA recomputing the
    # step (and copying the donated buffers it overwrites) in each consumer.
    guarded = [jnp.where(ok, w, x) if s else None
               for w, x, s in zip(stepped, latent, sets)]
    rule_state = step.rule if step.guarded else (
        optax.tree.where(ok, step.rule, state.rule))
    guarded, rule_state = jax.lax.optimization_barrier((guarded, rule_state))
    weights = step.weight(rule_state) if callable(step.weight) else (
        step.weight)
    # Codes are derived from the latent weights as stored (their dtype).
    kept = [w.astype(x.dtype) if s else x
            for w, x, s in zip(guarded, latent_in, sets)]
    new_scales = [to_store(n, w, s) if s else None for n, w, s in zip(
        scales_of(guarded, weights, start=step.start), kept, sets)]
    keep = ok if step.commit is True else jnp.logical_and(ok, step.commit)
    stored = [optax.tree.where(keep, n, o) if s else o
              for n, o, s in zip(new_scales, scales, sets)]
    if step.commit is True:
      # The emitted update reads the stored codes where there are any (one
      # byte), rather than recomputing them from the latent weights.
      stored = new_scales = jax.lax.optimization_barrier(stored)
    ups = [jnp.where(ok, n.dequantize(k, p.dtype) - p, 0) if s else
           jnp.where(ok, w - x, 0).astype(p.dtype) for n, k, p, w, x, s in zip(
               new_scales, kept, leaves, stepped, latent, sets)]
    new_latent = treedef.unflatten(kept)
    diag = state.diagnostics
    if diagnostics:
      prev = treedef.flatten_up_to(diag.prev_update)
      deltas = {i: guarded[i] - latent[i] for i in q_ix}
      stats = init_diagnostics()._replace(
          flip_fraction=fraction_changed(
              [new_scales[i].at(kept[i]).codes for i in q_ix],
              [old[i].codes for i in q_ix],
              int(sum(np.prod(leaves[i].shape) for i in q_ix))),
          update_cosine=cosine(list(deltas.values()), [prev[i] for i in q_ix]),
          **(step.trial or {}))
      diag = optax.tree.where(ok, DiagnosticsState(stats, treedef.unflatten(
          [deltas[i].astype(p.dtype) if i in deltas else x
           for i, (x, p) in enumerate(zip(prev, leaves))])), diag)
    new_state = state._replace(
        count=jnp.where(keep, optax.safe_increment(state.count), state.count),
        latent=new_latent if step.commit is True else optax.tree.where(
            step.commit, new_latent, state.latent),
        quantized=qdef.unflatten(stored), rule=rule_state,
        preprocess=optax.tree.where(ok, pre_state, state.preprocess),
        skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32),
        cost=make_cost(step.gradients, step.losses), diagnostics=diag)
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


