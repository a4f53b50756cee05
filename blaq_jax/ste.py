"""The straight-through rule of the engine: STE, BinaryConnect, BWN, TWN.

An inner Optax optimizer steps the latent weights on ``g * S'(w / alpha)``,
and the scale rule projects them; FOGZO and n-SPSA replace that gradient
with an :class:`Estimator` (:mod:`blaq_jax.fogzo`). The transforms are
:func:`blaq_jax.ste`, :func:`blaq_jax.binary_connect`, :func:`blaq_jax.bwn`
and :func:`blaq_jax.twn`; math and the table of the family:
``docs/methods.rst``, section "Straight-through baselines".
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blaq_jax import engine
from blaq_jax import quantizers
from blaq_jax import selection
from blaq_jax.levels import LevelSet
from blaq_jax.projection import expand_scale
from blaq_jax.state import STEState


class Estimator(NamedTuple):
  """Replaces the STE gradient of the quantized leaves (:mod:`blaq_jax.fogzo`).

  ``update(state, *, count, grads, latent, steps, surrogate, perturbed_params,
  extra_args) -> (grads, state, loss evaluations)``, lists over the quantized
  leaves; ``perturbed_params(latents)`` re-quantizes into the model's params.
  """

  init: Callable[[], Any]
  update: Callable[..., Any]
  needs: tuple = ()



def rule(optimizer, *, surrogate, scale, threshold, estimator=None,
         guarded=False):
  """The :class:`~blaq_jax.engine.Rule` of the STE family (of FOGZO and
  n-SPSA with an ``estimator``), for arguments :func:`blaq_jax.ste` has
  checked; ``guarded``: ``optimizer.update`` takes ``finite``, as
  :func:`blaq_jax.alias.guarded_adam`'s does."""

  def init(params, quantized):
    del quantized
    return STEState(optimizer.init(params),
                    estimator.init() if estimator else optax.EmptyState())

  def step(ctx, state):
    treedef = jax.tree.structure(ctx.params)
    leaves = treedef.flatten_up_to(ctx.params)
    q_ix = [i for i, qi in enumerate(ctx.is_quantized) if qi]

    def put(xs, new):  # xs with the quantized leaves replaced by new
      new = dict(zip(q_ix, new))
      return [new.get(i, x) for i, x in enumerate(xs)]

    qts = [ctx.quantized[i] for i in q_ix]
    alpha = [expand_scale(qt.alpha, leaves[i].ndim, qt.channel_axis)
             for i, qt in zip(q_ix, qts)]
    g_q = [ctx.grads[i] * quantizers.surrogate_grad(surrogate, ctx.latent[i],
                                                    a)
           for i, a in zip(q_ix, alpha)]
    def perturbed(ws):  # the params at the projection of these latents
      full = put(ctx.latent, ws)
      return ctx.params_at(full, ctx.project(full, None))

    est_state, losses, finite = state.estimator, 0, True
    if estimator is not None:
      g_q, est_state, losses = estimator.update(
          state.estimator, count=ctx.count, grads=g_q,
          latent=[ctx.latent[i] for i in q_ix],
          steps=[quantizers.step_size(a, qt.level_set)
                 for a, qt in zip(alpha, qts)],
          surrogate=surrogate, perturbed_params=perturbed,
          extra_args=ctx.extra_args)
      finite = engine.all_finite(g_q) if g_q else True
    as_params = lambda xs: treedef.unflatten(  # noqa: E731
        [x.astype(p.dtype) for x, p in zip(xs, leaves)])
    ok = jnp.logical_and(ctx.finite, finite)
    updates, inner = optimizer.update(
        as_params(put(ctx.grads, g_q)), state.inner, as_params(ctx.latent),
        **(dict(finite=ok) if guarded else {}))
    w = [x + u.astype(jnp.float32)
         for x, u in zip(ctx.latent, treedef.flatten_up_to(updates))]
    if guarded:
      est_state = optax.tree.where(ok, est_state, state.estimator)
    return engine.Step(latent=w, weight=None, rule=STEState(inner, est_state),
                       finite=finite, losses=losses, guarded=guarded)

  def project(w, d, level_set, prev, **kw):  # kw: channel_axis, tol, max_iter
    del d
    return quantizers.latent_scale(
        w, level_set, scale, threshold=threshold, **kw,
        prev_codes=getattr(prev, "codes", None),
        prev_alpha=getattr(prev, "alpha", None))

  return engine.Rule(init, step, project,
                     estimator.needs if estimator else (), fixed_rounds=True)


def level_sets(bits, kind):
  """``(params, quantize) -> [LevelSet or None per leaf]``: the sign at 1
  bit, ``LevelSet(kind, k)`` at ``k >= 2``."""
  return lambda params, quantize: [
      None if not b else LevelSet("blaq", 1) if b == 1 else LevelSet(kind, b)
      for b in selection.resolve_bits(params, quantize, bits, "blaq")]
