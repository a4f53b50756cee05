"""Straight-through (STE) training: generic STE, BinaryConnect, BWN, TWN.

One engine rule: an inner Optax optimizer steps the latent weights on
``g * S'(w / alpha)``, and the scale rule projects them. Math and the table of
the family: ``docs/methods.rst``, section "Straight-through baselines".
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from blaq_jax import engine
from blaq_jax import quantizers
from blaq_jax import selection
from blaq_jax.levels import KINDS, LevelSet, check_bits
from blaq_jax.projection import expand_scale

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
QUANTIZERS = ("sign", "ternary", "uniform")


class STEState(NamedTuple):
  """The rule state of the STE family, FOGZO and n-SPSA.

  Attributes:
    inner: state of the inner Optax optimizer (its params: the latent weights
      at quantized leaves, the params elsewhere).
    estimator: :class:`blaq_jax.fogzo.FOGZOState`, or ``optax.EmptyState()``
      for plain STE.
  """

  inner: Any
  estimator: Any


class Estimator(NamedTuple):
  """Replaces the STE gradient of the quantized leaves (:mod:`blaq_jax.fogzo`).

  ``update(state, *, count, grads, latent, steps, surrogate, perturbed_params,
  extra_args) -> (grads, state, loss evaluations)``, lists over the quantized
  leaves; ``perturbed_params(latents)`` re-quantizes into the model's params.
  """

  init: Callable[[], Any]
  update: Callable[..., Any]
  needs: tuple = ()


def straight_through(learning_rate, *, optimizer=None, quantizer="sign",
                     bits=None, level_set="linear", surrogate=None,
                     scale="fit", threshold=0.7, estimator=None, who="ste",
                     **options) -> optax.GradientTransformationExtraArgs:
  """:func:`ste` whose STE gradient an ``estimator`` (:mod:`blaq_jax.fogzo`)
  may replace; ``who`` names the method in error messages."""
  for name, value, known in (("quantizer", quantizer, QUANTIZERS),
                             ("level_set", level_set, KINDS)):
    if value not in known:
      raise ValueError(f"{who}: unknown {name}={value!r}; expected one of "
                       f"{known}.")
  native = {"sign": 1, "ternary": 2}.get(quantizer)
  bits = check_bits((native or 2) if bits is None else bits, "blaq",
                    where="bits")
  if native is not None and bits != native:
    raise ValueError(
        f"{who}: quantizer={quantizer!r} has {native} bit(s), got bits={bits}"
        " (use quantizer='uniform' for other widths, or the quantize rule to "
        "give single leaves other widths).")
  kind = "linear" if quantizer == "ternary" else level_set
  if surrogate is None:
    surrogate = "hardtanh" if quantizer == "sign" else "identity"
  quantizers.check_surrogate(surrogate, where="surrogate")
  scale = quantizers.check_scale(scale, where="scale")
  guarded = optimizer is None
  if optimizer is None:
    if learning_rate is None:
      raise ValueError(f"{who}: give a learning_rate or an optimizer.")
    optimizer = guarded_adam(learning_rate)

  def level_sets(params, quantize):
    return [None if not b else LevelSet("blaq", 1) if b == 1 else
            LevelSet(kind, b)
            for b in selection.resolve_bits(params, quantize, bits, "blaq")]

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

  rule = engine.Rule(init, step, project, estimator.needs if estimator else (),
                     fixed_rounds=True)
  return engine.quantized_latent(rule, level_sets, who=who, **options)


def guarded_adam(learning_rate: ScalarOrSchedule, b1: float = 0.9,
                 b2: float = 0.999, eps: float = 1e-8
                 ) -> optax.GradientTransformationExtraArgs:
  """``optax.adam`` whose ``update`` also takes ``finite``: the state is kept
  when it is False, and the new moments are written once before the step
  reads them. Same state and arithmetic as ``optax.adam``; the default inner
  optimizer of the STE family (the engine then need not select the state
  again, which made XLA copy the donated moments).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> opt = guarded_adam(0.1)
    >>> u, state = opt.update({"w": jnp.array([0.5, jnp.nan])},
    ...                       opt.init(params), params, finite=False)
    >>> int(optax.tree.get(state, "count")), u["w"].tolist()
    (0, [0.0, 0.0])
  """
  base = optax.adam(learning_rate, b1, b2, eps)

  def update(updates, state, params=None, *, finite=True, **extra):
    del params, extra
    adam, schedule = state
    mu = optax.tree.update_moment(updates, adam.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, adam.nu, b2, 2)
    count = optax.safe_increment(adam.count)
    new = (optax.ScaleByAdamState(count, mu, nu), schedule)
    lr = learning_rate
    if callable(learning_rate):
      lr = learning_rate(schedule.count)
      new = (new[0], optax.ScaleByScheduleState(
          optax.safe_increment(schedule.count)))
    new = jax.lax.optimization_barrier(optax.tree.where(finite, new, state))
    mu, nu, count = new[0].mu, new[0].nu, new[0].count
    step = jax.tree.map(
        lambda m, v: -lr * (m / (jnp.sqrt(v) + eps)),
        optax.tree.bias_correction(mu, b1, count),
        optax.tree.bias_correction(nu, b2, count))
    return jax.tree.map(lambda x: jnp.where(finite, x, 0), step), new

  return optax.GradientTransformationExtraArgs(base.init, update)


@engine.with_options()
def ste(learning_rate: Optional[ScalarOrSchedule], *,
        optimizer: Optional[optax.GradientTransformation] = None,
        quantizer: str = "sign", bits: Optional[int] = None,
        level_set: str = "linear", surrogate: Optional[str] = None,
        scale: quantizers.Scale = "fit", threshold: float = 0.7,
        **options) -> optax.GradientTransformationExtraArgs:
  """Straight-through training of quantized weights (:ref:`ste-rule`).

  .. math:: w \\leftarrow w + \\operatorname{opt}(g \\odot S'(w / \\alpha)),
    \\qquad q = \\alpha\\, \\operatorname{nearest}_Q(w / \\alpha)

  Args:
    learning_rate: of the default inner ``optax.adam`` (``None`` if
      ``optimizer`` is given).
    optimizer: inner Optax optimizer of the latent weights and of the
      full-precision leaves.
    quantizer: ``"sign"`` (1 bit), ``"ternary"`` (2 bits) or ``"uniform"``.
    bits: default width of quantized leaves (``"uniform"``: 2); a leaf at
      ``k >= 2`` bits uses ``LevelSet(level_set, k)``, at 1 bit the sign.
    level_set: ``"linear"`` (with zero), ``"blaq"`` (no zero) or ``"log"``.
    surrogate: one of :data:`blaq_jax.quantizers.SURROGATES` (default
      ``"hardtanh"`` for ``"sign"``, else ``"identity"``).
    scale: ``"fit"`` (least squares), ``"twn"``, ``"max"`` or a fixed float.
    threshold: TWN's threshold factor (``scale="twn"``).
    **options: the engine's options, :func:`blaq_jax.engine.quantized_latent`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blaq_jax
    >>> target = jnp.array([[0.7, -0.6], [0.9, 0.05]])
    >>> loss = lambda p: jnp.sum((p["kernel"] - target) ** 2)
    >>> params = {"kernel": jnp.array([[0.1, 0.2], [-0.1, 0.1]])}
    >>> opt = blaq_jax.ste(0.05, quantizer="ternary", scale=0.5)
    >>> state = opt.init(params)
    >>> for _ in range(40):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> params["kernel"].tolist()
    [[0.5, -0.5], [0.5, 0.0]]
  """
  return straight_through(
      learning_rate, optimizer=optimizer, quantizer=quantizer, bits=bits,
      level_set=level_set, surrogate=surrogate, scale=scale,
      threshold=threshold, who="ste", **options)


# ste's own arguments with their defaults, which fogzo and n_spsa take too.
STE_OPTIONS = {k: p.default for k, p in inspect.signature(ste).parameters
               .items() if p.kind is p.KEYWORD_ONLY and k not in engine.OPTIONS}


@engine.with_options(clip_latent=1.0, channel_axis=engine.DROP)
def binary_connect(learning_rate: Optional[ScalarOrSchedule], *,
                   optimizer: Optional[optax.GradientTransformation] = None,
                   **options) -> optax.GradientTransformationExtraArgs:
  """BinaryConnect (Courbariaux et al. 2015): ``q = sign(w)``.

  Scale 1, the hardtanh STE ``g 1[|w| <= 1]``, latent weights clipped to
  ``[-1, 1]``; leaves given ``k >= 2`` bits use the ``"linear"`` grid.

  Args:
    learning_rate, optimizer: as in :func:`ste`.
    **options: the engine's options; no ``channel_axis``, ``clip_latent=1``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, blaq_jax
    >>> params = {"kernel": jnp.array([[0.3, -0.2]])}
    >>> opt = blaq_jax.binary_connect(0.1)
    >>> updates, _ = opt.update({"kernel": jnp.array([[1.0, 1.0]])},
    ...                         opt.init(params), params)
    >>> optax.apply_updates(params, updates)["kernel"].tolist()
    [[1.0, -1.0]]
  """
  return straight_through(
      learning_rate, optimizer=optimizer, quantizer="sign",
      surrogate="hardtanh", scale=1.0, who="binary_connect", **options)


@engine.with_options()
def bwn(learning_rate: Optional[ScalarOrSchedule], *,
        optimizer: Optional[optax.GradientTransformation] = None,
        surrogate: str = "identity",
        **options) -> optax.GradientTransformationExtraArgs:
  """Binary-weight networks (XNOR-Net's BWN, Rastegari et al. 2016).

  .. math:: q = \\alpha\\, \\operatorname{sign}(w),\\qquad
    \\alpha = \\tfrac{1}{n} \\textstyle\\sum_i |w_i|

  per tensor, or per slice of ``channel_axis``.

  Args:
    learning_rate, optimizer, surrogate: as in :func:`ste` (default
      identity surrogate).
    **options: the engine's options, :func:`blaq_jax.engine.quantized_latent`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, blaq_jax
    >>> params = {"kernel": jnp.array([[0.3, -0.1], [0.2, -0.4]])}
    >>> state = blaq_jax.bwn(1e-3).init(params)
    >>> blaq_jax.quantized_params(params, state)["kernel"].tolist()
    [[0.25, -0.25], [0.25, -0.25]]
  """
  return straight_through(
      learning_rate, optimizer=optimizer, quantizer="sign",
      surrogate=surrogate, scale="fit", who="bwn", **options)


@engine.with_options()
def twn(learning_rate: Optional[ScalarOrSchedule], *,
        optimizer: Optional[optax.GradientTransformation] = None,
        threshold: float = 0.7, surrogate: str = "identity",
        **options) -> optax.GradientTransformationExtraArgs:
  """Ternary weight networks (Li et al. 2016).

  .. math:: \\Delta = t\\, \\tfrac{1}{n} \\textstyle\\sum_i |w_i|,\\quad
    I = \\{i : |w_i| > \\Delta\\},\\quad
    \\alpha = \\tfrac{1}{|I|} \\textstyle\\sum_{i \\in I} |w_i|,\\quad
    q_i = \\alpha \\operatorname{sign}(w_i) 1[i \\in I]

  Leaves given another width by ``quantize`` use the least-squares scale.

  Args:
    learning_rate, optimizer, surrogate: as in :func:`ste` (default
      identity surrogate).
    threshold: ``t``.
    **options: the engine's options; ``channel_axis`` gives each slice its
      own ``Delta, alpha``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, blaq_jax
    >>> params = {"kernel": jnp.array([[0.75, -0.0625], [0.125, -0.5]])}
    >>> state = blaq_jax.twn(1e-3).init(params)
    >>> # delta = 0.7 * 0.359375, alpha = (0.75 + 0.5) / 2
    >>> blaq_jax.quantized_params(params, state)["kernel"].tolist()
    [[0.625, 0.0], [0.0, -0.625]]
  """
  return straight_through(
      learning_rate, optimizer=optimizer, quantizer="ternary",
      surrogate=surrogate, scale="twn", threshold=threshold, who="twn",
      **options)
