"""Straight-through (STE) training: generic STE, BinaryConnect, BWN, TWN.

The model computes with the quantized weights ``q_t``; the transform keeps
the latent weights ``w_t`` in its state. Per quantized tensor, with ``g`` the
gradient of the loss at ``q_t`` (what the transform receives as ``updates``)
and ``alpha_t`` the scale of ``q_t``:

.. math::

  \\tilde g_t = g \\odot S'(w_t / \\alpha_t), \\qquad
  w_{t+1} = w_t + \\operatorname{opt}(\\tilde g_t), \\qquad
  q_{t+1} = \\alpha_{t+1} \\operatorname{nearest}_Q(w_{t+1} / \\alpha_{t+1}),

where ``S'`` is the surrogate derivative of :mod:`blaq_jax.quantizers`,
``opt`` an inner Optax optimizer (Adam by default) applied to the latent
weights, and ``alpha_{t+1}`` the scale rule's value at ``w_{t+1}``. The
transform emits ``updates = q_{t+1} - params``, so ``optax.apply_updates``
lands on the level set, like :func:`blaq_jax.laq`. Full-precision leaves get
the inner optimizer's update of their plain gradient.

=================  ========  ==========  ===========  =====================
method             levels    scale       surrogate    latent
=================  ========  ==========  ===========  =====================
binary_connect     sign      1           hardtanh     clipped to [-1, 1]
bwn                sign      mean |w|    identity     free
twn                ternary   TWN rule    identity     free
=================  ========  ==========  ===========  =====================

Leaf selection and per-leaf bit widths follow :mod:`blaq_jax.selection`
(default: dense/conv kernels). A leaf at 1 bit uses the sign quantizer, a leaf
at ``k >= 2`` bits the level set ``LevelSet(level_set, k)`` (``"linear"``:
the symmetric uniform grid with zero, ``2^k - 1`` levels, so 2 bits is
ternary).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from blaq_jax import engine
from blaq_jax import quantizers
from blaq_jax import selection
from blaq_jax.levels import KINDS, LevelSet, check_bits
from blaq_jax.projection import _expand

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
QUANTIZERS = ("sign", "ternary", "uniform")
# ste's own arguments, which fogzo and n_spsa take too.
STE_OPTIONS = dict(optimizer=None, quantizer="sign", bits=None,
                   level_set="linear", surrogate=None, scale="fit",
                   threshold=0.7)


class STEState(NamedTuple):
  """The rule state of the STE family, :func:`blaq_jax.fogzo` and
  :func:`blaq_jax.n_spsa` (inside
  :class:`~blaq_jax.engine.QuantizedLatentState`, field ``rule``).

  Attributes:
    inner: state of the inner Optax optimizer (whose params are the latent
      weights at quantized leaves and the params elsewhere).
    estimator: state of the gradient estimator replacing the STE gradient
      (:class:`blaq_jax.fogzo.FOGZOState`; ``optax.EmptyState()`` for plain
      STE).
  """

  inner: Any
  estimator: Any


class Estimator(NamedTuple):
  """A replacement for the STE gradient of the quantized leaves (internal).

  ``init()`` returns its state; ``update(state, *, count, grads, latent,
  steps, surrogate, perturbed_params, extra_args)`` returns the new
  gradients (a list over quantized leaves, in ``jax.tree.leaves`` order), its
  new state and the number of loss evaluations it made. ``steps`` are the
  quantization steps of ``q_t`` broadcast against each leaf;
  ``perturbed_params(latents)`` re-quantizes latent weights and returns the
  params tree the model would see.
  """

  init: Callable[[], Any]
  update: Callable[..., Any]
  needs: tuple = ()


def straight_through_rule(optimizer: optax.GradientTransformation,
                          surrogate: str, scale: quantizers.Scale,
                          threshold: float,
                          estimator: Optional[Estimator] = None):
  """The :class:`~blaq_jax.engine.Rule` of the STE family (module doc)."""

  def init(params, quantized):
    del quantized
    return STEState(optimizer.init(params),
                    estimator.init() if estimator else optax.EmptyState())

  def step(ctx, state):
    treedef = jax.tree.structure(ctx.params)
    leaves = treedef.flatten_up_to(ctx.params)
    q_ix = [i for i, qi in enumerate(ctx.is_quantized) if qi]
    alpha = {i: _expand(ctx.quantized[i].alpha, leaves[i].ndim,
                        ctx.quantized[i].channel_axis) for i in q_ix}
    g_q = [ctx.grads[i] * quantizers.surrogate_grad(
        surrogate, ctx.latent[i] / alpha[i]) for i in q_ix]
    est_state, losses, finite = state.estimator, 0, True
    if estimator is not None:
      def perturbed_params(latents):
        ws = list(ctx.latent)
        for k, i in enumerate(q_ix):
          ws[i] = latents[k]
        return ctx.params_at(ctx.project(ws, None))

      g_q, est_state, losses = estimator.update(
          state.estimator, count=ctx.count, grads=g_q,
          latent=[ctx.latent[i] for i in q_ix],
          steps=[quantizers.step_size(alpha[i], ctx.quantized[i].level_set)
                 for i in q_ix],
          surrogate=surrogate, perturbed_params=perturbed_params,
          extra_args=ctx.extra_args)
      finite = jnp.stack([jnp.all(jnp.isfinite(x)) for x in g_q]).all() if (
          g_q) else True
    grads = list(ctx.grads)
    for k, i in enumerate(q_ix):
      grads[i] = g_q[k]
    inner_params = [w.astype(p.dtype) for w, p in zip(ctx.latent, leaves)]
    inner_updates, inner_state = optimizer.update(
        treedef.unflatten([x.astype(p.dtype) for x, p in zip(grads, leaves)]),
        state.inner, treedef.unflatten(inner_params))
    w = [x + u.astype(jnp.float32) for x, u in
         zip(ctx.latent, treedef.flatten_up_to(inner_updates))]
    return engine.Step(latent=w, weight=None,
                       rule=STEState(inner_state, est_state), finite=finite,
                       losses=losses)

  def project(w, d, level_set, prev, *, channel_axis, tol, max_iter):
    del d
    return quantizers.quantize_latent(
        w, level_set, scale, channel_axis=channel_axis, threshold=threshold,
        prev_codes=None if prev is None else prev.codes,
        prev_alpha=None if prev is None else prev.alpha,
        tol=tol, max_iter=max_iter)

  return engine.Rule(init, step, project,
                     estimator.needs if estimator else ())


def straight_through(
    learning_rate: Optional[ScalarOrSchedule], *,
    optimizer: Optional[optax.GradientTransformation] = None,
    quantizer: str = "sign", bits: Optional[int] = None,
    level_set: str = "linear", surrogate: Optional[str] = None,
    scale: quantizers.Scale = "fit", threshold: float = 0.7,
    estimator: Optional[Estimator] = None, who: str = "ste", **options,
) -> optax.GradientTransformationExtraArgs:
  """The transform of :func:`ste`'s arguments with an optional estimator
  (:mod:`blaq_jax.fogzo`); ``who`` names the method in error messages."""
  if quantizer not in QUANTIZERS:
    raise ValueError(f"{who}: unknown quantizer={quantizer!r}; expected one "
                     f"of {QUANTIZERS}.")
  if level_set not in KINDS:
    raise ValueError(f"{who}: unknown level_set={level_set!r}; expected one "
                     f"of {KINDS}.")
  native = {"sign": 1, "ternary": 2}.get(quantizer)
  if bits is None:
    bits = native or 2
  bits = check_bits(bits, "blaq", where="bits")
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
  if optimizer is None:
    if learning_rate is None:
      raise ValueError(f"{who}: give a learning_rate or an optimizer.")
    optimizer = optax.adam(learning_rate)

  def level_sets(params, quantize):
    return [None if not b else LevelSet("blaq", 1) if b == 1 else
            LevelSet(kind, b)
            for b in selection.resolve_bits(params, quantize, bits, "blaq")]

  rule = straight_through_rule(optimizer, surrogate, scale, threshold,
                               estimator)
  return engine.quantized_latent(rule, level_sets, who=who, **options)


@engine.with_options()
def ste(
    learning_rate: Optional[ScalarOrSchedule],
    *,
    optimizer: Optional[optax.GradientTransformation] = None,
    quantizer: str = "sign",
    bits: Optional[int] = None,
    level_set: str = "linear",
    surrogate: Optional[str] = None,
    scale: quantizers.Scale = "fit",
    threshold: float = 0.7,
    **options,
) -> optax.GradientTransformationExtraArgs:
  """Straight-through training of quantized weights.

  .. math::

    \\tilde g = g \\odot S'(w / \\alpha),\\quad
    w \\leftarrow w + \\operatorname{opt}(\\tilde g),\\quad
    q = \\alpha\\, \\operatorname{nearest}_Q(w / \\alpha)

  Args:
    learning_rate: float or Optax schedule of the default inner optimizer
      (``optax.adam``); may be ``None`` when ``optimizer`` is given.
    optimizer: inner Optax optimizer of the latent weights (and of the
      full-precision leaves); default ``optax.adam(learning_rate)``.
    quantizer: ``"sign"`` (1 bit, ``{-1, +1}``), ``"ternary"`` (2 bits,
      ``{-1, 0, 1}``) or ``"uniform"`` (``bits`` bits on the level set
      ``level_set``).
    bits: default width of quantized leaves (``"uniform"``: default 2).
      Leaves given another width by ``quantize`` use the sign quantizer at 1
      bit and ``LevelSet(level_set, k)`` at ``k`` bits.
    level_set: level-set kind of multi-bit leaves: ``"linear"`` (default,
      uniform with zero), ``"blaq"`` (``2^k`` levels, no zero) or ``"log"``.
    surrogate: STE surrogate, one of
      :data:`blaq_jax.quantizers.SURROGATES`, in units of ``alpha``; default
      ``"hardtanh"`` for ``"sign"``, ``"identity"`` otherwise.
    scale: scale rule (:func:`blaq_jax.quantizers.quantize_latent`):
      ``"fit"`` (least squares; ``mean |w|`` at 1 bit), ``"twn"``, ``"max"``
      or a fixed positive float.
    threshold: TWN's threshold factor (``scale="twn"``).
    **options: the engine's options, common to every quantizing method:
      ``quantize``, ``channel_axis``, ``clip_latent``, ``preprocess``,
      ``diagnostics``, ``batch_axis_name``, ``tol``, ``max_iter``
      (``"fit"``'s tolerance and round cap); see
      :func:`blaq_jax.engine.quantized_latent`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` takes
    ``(grads, state, params)`` with ``grads`` the gradient at the quantized
    params and ignores extra keyword arguments.

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


@engine.with_options(clip_latent=1.0, channel_axis=engine.DROP)
def binary_connect(
    learning_rate: Optional[ScalarOrSchedule],
    *,
    optimizer: Optional[optax.GradientTransformation] = None,
    **options,
) -> optax.GradientTransformationExtraArgs:
  """BinaryConnect (Courbariaux et al. 2015): ``q = sign(w)``.

  Sign with a fixed scale of 1, the hardtanh STE ``g 1[|w| <= 1]`` and the
  latent weights clipped to ``[-1, 1]``. Leaves given ``k >= 2`` bits by
  ``quantize`` use the ``"linear"`` grid on ``[-1, 1]``.

  Args:
    learning_rate: float or schedule of the default inner Adam.
    optimizer: inner optimizer instead of Adam.
    **options: the engine's options as in :func:`ste` (no
      ``channel_axis``: the scale is 1); ``clip_latent`` defaults to 1.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blaq_jax
    >>> params = {"kernel": jnp.array([[0.3, -0.2]])}
    >>> opt = blaq_jax.binary_connect(0.1)
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"kernel": jnp.array([[1.0, 1.0]])},
    ...                             state, params)
    >>> optax.apply_updates(params, updates)["kernel"].tolist()
    [[1.0, -1.0]]
  """
  return straight_through(
      learning_rate, optimizer=optimizer, quantizer="sign", surrogate=
      "hardtanh", scale=1.0, who="binary_connect", **options)


@engine.with_options()
def bwn(
    learning_rate: Optional[ScalarOrSchedule],
    *,
    optimizer: Optional[optax.GradientTransformation] = None,
    surrogate: str = "identity",
    **options,
) -> optax.GradientTransformationExtraArgs:
  """Binary-weight networks (XNOR-Net's BWN, Rastegari et al. 2016).

  .. math::

    q = \\alpha\\, \\operatorname{sign}(w),\\qquad
    \\alpha = \\frac{1}{n} \\sum_i |w_i|

  per tensor, or per slice of ``channel_axis``; the STE gradient
  ``g S'(w / alpha)`` with the identity surrogate by default.

  Args:
    learning_rate, optimizer: as in :func:`ste`.
    surrogate: STE surrogate (default identity).
    **options: the engine's options as in :func:`ste`; ``channel_axis``:
      ``None`` (per tensor) or the axis with its own ``alpha``.

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
def twn(
    learning_rate: Optional[ScalarOrSchedule],
    *,
    optimizer: Optional[optax.GradientTransformation] = None,
    threshold: float = 0.7,
    surrogate: str = "identity",
    **options,
) -> optax.GradientTransformationExtraArgs:
  """Ternary weight networks (Li et al. 2016).

  .. math::

    \\Delta = t\\, \\tfrac{1}{n} \\textstyle\\sum_i |w_i|,\\quad
    I = \\{i : |w_i| > \\Delta\\},\\quad
    \\alpha = \\tfrac{1}{|I|} \\textstyle\\sum_{i \\in I} |w_i|,\\quad
    q_i = \\alpha \\operatorname{sign}(w_i) 1[i \\in I]

  with ``t = 0.7``, and the identity STE. Leaves given another width by
  ``quantize`` use the least-squares scale (TWN's rule approximates it for
  ternary weights).

  Args:
    learning_rate, optimizer: as in :func:`ste`.
    threshold: ``t``.
    surrogate: STE surrogate (default identity).
    **options: the engine's options as in :func:`ste`; ``channel_axis``:
      ``None`` (per tensor) or the axis with its own ``Delta, alpha``.

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
