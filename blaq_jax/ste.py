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
import numpy as np
import optax

from blaq_jax import quantizers
from blaq_jax import selection
from blaq_jax.levels import KINDS, LevelSet, check_bits
from blaq_jax.projection import _expand
from blaq_jax.state import Diagnostics, QuantizedTensor, cosine
from blaq_jax.state import fraction_changed, init_diagnostics
from blaq_jax.state import StepCost, make_cost

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
QUANTIZERS = ("sign", "ternary", "uniform")
_MASK = optax.MaskedNode()


class STEState(NamedTuple):
  """State of :func:`ste`, :func:`binary_connect`, :func:`bwn`, :func:`twn`
  and of :func:`blaq_jax.fogzo` / :func:`blaq_jax.n_spsa`.

  Attributes:
    count: number of completed steps, int32.
    inner: state of the inner Optax optimizer (whose params are the latent
      weights at quantized leaves and the params elsewhere).
    latent: latent full-precision weights ``w`` (MaskedNode at leaves
      trained in full precision).
    quantized: :class:`~blaq_jax.state.QuantizedTensor` of ``q_t`` at
      quantized leaves (MaskedNode elsewhere).
    prev_update: the last latent update ``w_t - w_{t-1}`` of quantized leaves
      (MaskedNode when ``diagnostics=False``).
    diagnostics: :class:`~blaq_jax.state.Diagnostics` (``flip_fraction``,
      ``update_cosine``; the trial fields stay zero).
    estimator: state of the gradient estimator replacing the STE gradient
      (:class:`blaq_jax.fogzo.FOGZOState`; ``optax.EmptyState()`` for plain
      STE).
    cost: :class:`~blaq_jax.state.StepCost` of the last step.
  """

  count: jax.Array
  inner: Any
  latent: Any
  quantized: Any
  prev_update: Any
  diagnostics: Diagnostics
  estimator: Any
  cost: StepCost


class Estimator(NamedTuple):
  """A replacement for the STE gradient of the quantized leaves (internal).

  ``init()`` returns its state; ``update(state, *, count, grads, latent,
  steps, surrogate, perturbed_params, extra_args)`` returns the new
  gradients (a list over quantized leaves, in ``jax.tree.leaves`` order) and
  its new state. ``steps`` are the quantization steps of ``q_t`` broadcast
  against each leaf; ``perturbed_params(latents)`` re-quantizes latent
  weights and returns the params tree the model would see.
  """

  init: Callable[[], Any]
  update: Callable[..., Any]


def _check_positive_or_none(name, value):
  if value is None or isinstance(value, jax.core.Tracer):
    return
  if np.ndim(value) != 0 or not float(value) > 0:
    raise ValueError(f"{name} must be positive or None, got {value!r}.")


def straight_through(
    learning_rate: Optional[ScalarOrSchedule],
    *,
    optimizer: Optional[optax.GradientTransformation] = None,
    quantizer: str = "sign",
    bits: Optional[int] = None,
    level_set: str = "linear",
    surrogate: Optional[str] = None,
    scale: quantizers.Scale = "fit",
    threshold: float = 0.7,
    quantize: selection.Quantize = None,
    channel_axis: Optional[int] = None,
    clip_latent: Optional[float] = None,
    diagnostics: bool = True,
    tol: float = 1e-6,
    max_iter: int = 20,
    estimator: Optional[Estimator] = None,
    who: str = "ste",
) -> optax.GradientTransformationExtraArgs:
  """The one implementation behind :func:`ste` and the FOGZO family.

  See :func:`ste` for the arguments; ``estimator`` replaces the STE gradient
  of the quantized leaves (:mod:`blaq_jax.fogzo`), ``who`` names the method
  in error messages.
  """
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
  _check_positive_or_none("clip_latent", clip_latent)
  if optimizer is None:
    if learning_rate is None:
      raise ValueError(f"{who}: give a learning_rate or an optimizer.")
    optimizer = optax.adam(learning_rate)

  def level_set_for(b):
    if not b:
      return None
    return LevelSet("blaq", 1) if b == 1 else LevelSet(kind, b)

  def layout(params):
    selection.check_float_leaves(params, who)
    leaves, treedef = jax.tree.flatten(params)
    sets = [level_set_for(b) for b in
            selection.resolve_bits(params, quantize, bits, "blaq")]
    return leaves, treedef, sets

  def quantize_leaf(w, s, prev=None):
    alpha, codes = quantizers.quantize_latent(
        w, s, scale, channel_axis=channel_axis, threshold=threshold,
        prev_codes=None if prev is None else prev.codes,
        prev_alpha=None if prev is None else prev.alpha,
        tol=tol, max_iter=max_iter)
    return QuantizedTensor(codes, alpha, s, channel_axis)

  def init_fn(params):
    leaves, treedef, sets = layout(params)

    def per_q(fn):
      return treedef.unflatten(
          [fn(p, s) if s else _MASK for p, s in zip(leaves, sets)])

    latent = per_q(lambda p, s: jnp.array(p, copy=True))
    return STEState(
        count=jnp.zeros([], jnp.int32),
        inner=optimizer.init(params),
        latent=latent,
        quantized=selection.pure_structure(params).unflatten(
            [quantize_leaf(p, s) if s else _MASK
             for p, s in zip(leaves, sets)]),
        prev_update=per_q(lambda p, s: jnp.zeros_like(p) if diagnostics
                          else _MASK),
        diagnostics=init_diagnostics(),
        estimator=(estimator.init() if estimator is not None
                   else optax.EmptyState()),
        cost=make_cost(),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{who} needs params: call update(grads, state, "
                       "params).")
    leaves, treedef, sets = layout(params)
    selection.check_same_structure(params, updates, f"{who}: the gradient")
    q_ix = [i for i, s in enumerate(sets) if s]
    n_q = int(sum(np.prod(leaves[i].shape) for i in q_ix))
    paths = [selection.path_str(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]]
    g = [x.astype(jnp.float32) for x in treedef.flatten_up_to(updates)]
    latent = treedef.flatten_up_to(state.latent)
    qdef = selection.pure_structure(params)  # see pure_structure
    qts = qdef.flatten_up_to(state.quantized)
    for i in q_ix:
      if not isinstance(qts[i], QuantizedTensor) or qts[i].level_set != sets[i]:
        raise ValueError(
            f"{who}: the state does not match this optimizer's configuration "
            f"at leaf '{paths[i]}' (state: "
            f"{getattr(qts[i], 'level_set', qts[i])}, optimizer: {sets[i]}); "
            "was it created by another config?")

    w = {i: latent[i].astype(jnp.float32) for i in q_ix}
    alpha = {i: _expand(qts[i].alpha, w[i].ndim, channel_axis) for i in q_ix}
    ste_g = [g[i] * quantizers.surrogate_grad(surrogate, w[i] / alpha[i])
             for i in q_ix]

    est_state = state.estimator
    if estimator is not None:

      def perturbed_params(latents):
        out = list(leaves)
        for k, i in enumerate(q_ix):
          qt = quantize_leaf(latents[k], sets[i], qts[i])
          out[i] = qt.dequantize(leaves[i].dtype)
        return treedef.unflatten(out)

      ste_g, est_state = estimator.update(
          state.estimator, count=state.count, grads=ste_g,
          latent=[w[i] for i in q_ix],
          steps=[quantizers.step_size(alpha[i], sets[i]) for i in q_ix],
          surrogate=surrogate, perturbed_params=perturbed_params,
          extra_args=extra_args)

    grads = list(g)
    inner_params = list(leaves)
    for k, i in enumerate(q_ix):
      grads[i] = ste_g[k]
      inner_params[i] = latent[i]
    grads = [x.astype(p.dtype) for x, p in zip(grads, inner_params)]
    inner_updates, inner_state = optimizer.update(
        treedef.unflatten(grads), state.inner,
        treedef.unflatten(inner_params))
    inner_updates = treedef.flatten_up_to(inner_updates)

    ups, new_latent, new_qts, steps = list(inner_updates), list(latent), list(
        qts), []
    for i in q_ix:
      w_new = w[i] + inner_updates[i].astype(jnp.float32)
      if clip_latent is not None:
        w_new = jnp.clip(w_new, -clip_latent, clip_latent)
      qt = quantize_leaf(w_new, sets[i], qts[i])
      steps.append(w_new - w[i])
      new_latent[i] = w_new.astype(latent[i].dtype)
      new_qts[i] = qt
      ups[i] = qt.dequantize(leaves[i].dtype) - leaves[i]
    ups = [u.astype(p.dtype) for u, p in zip(ups, leaves)]

    prev = treedef.flatten_up_to(state.prev_update)
    new_prev = list(prev)
    if diagnostics:
      for k, i in enumerate(q_ix):
        new_prev[i] = steps[k].astype(leaves[i].dtype)
    diag = init_diagnostics()._replace(
        flip_fraction=fraction_changed([new_qts[i].codes for i in q_ix],
                                       [qts[i].codes for i in q_ix], n_q),
        update_cosine=(cosine(steps, [prev[i] for i in q_ix]) if diagnostics
                       else jnp.zeros([], jnp.float32)))
    new_state = STEState(
        count=optax.safe_increment(state.count),
        inner=inner_state,
        latent=treedef.unflatten(new_latent),
        quantized=qdef.unflatten(new_qts),
        prev_update=treedef.unflatten(new_prev),
        diagnostics=diag,
        estimator=est_state,
        cost=make_cost(1, getattr(est_state, "losses_evaluated", 0)))
    return treedef.unflatten(ups), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
    quantize: selection.Quantize = None,
    channel_axis: Optional[int] = None,
    clip_latent: Optional[float] = None,
    diagnostics: bool = True,
    tol: float = 1e-6,
    max_iter: int = 20,
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
    quantize: which leaves are quantized, and at how many bits
      (:mod:`blaq_jax.selection`; default: dense/conv kernels).
    channel_axis: ``None`` (one scale per tensor) or the scaled axis
      (``-1`` for Flax kernels).
    clip_latent: clip the latent weights to ``[-c, c]`` after each step.
    diagnostics: keep the last latent update for ``update_cosine``.
    tol, max_iter: ``"fit"``'s convergence tolerance and round cap.

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
      threshold=threshold, quantize=quantize, channel_axis=channel_axis,
      clip_latent=clip_latent, diagnostics=diagnostics, tol=tol,
      max_iter=max_iter, who="ste")


def binary_connect(
    learning_rate: Optional[ScalarOrSchedule],
    *,
    optimizer: Optional[optax.GradientTransformation] = None,
    quantize: selection.Quantize = None,
    clip_latent: float = 1.0,
    diagnostics: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """BinaryConnect (Courbariaux et al. 2015): ``q = sign(w)``.

  Sign with a fixed scale of 1, the hardtanh STE ``g 1[|w| <= 1]`` and the
  latent weights clipped to ``[-1, 1]``. Leaves given ``k >= 2`` bits by
  ``quantize`` use the ``"linear"`` grid on ``[-1, 1]``.

  Args:
    learning_rate: float or schedule of the default inner Adam.
    optimizer: inner optimizer instead of Adam.
    quantize: which leaves are binarized (default: kernels).
    clip_latent: the latent clipping bound (1).
    diagnostics: as in :func:`ste`.

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
      "hardtanh", scale=1.0, quantize=quantize, clip_latent=clip_latent,
      diagnostics=diagnostics, who="binary_connect")


def bwn(
    learning_rate: Optional[ScalarOrSchedule],
    *,
    optimizer: Optional[optax.GradientTransformation] = None,
    quantize: selection.Quantize = None,
    channel_axis: Optional[int] = None,
    surrogate: str = "identity",
    clip_latent: Optional[float] = None,
    diagnostics: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Binary-weight networks (XNOR-Net's BWN, Rastegari et al. 2016).

  .. math::

    q = \\alpha\\, \\operatorname{sign}(w),\\qquad
    \\alpha = \\frac{1}{n} \\sum_i |w_i|

  per tensor, or per slice of ``channel_axis``; the STE gradient
  ``g S'(w / alpha)`` with the identity surrogate by default.

  Args:
    learning_rate, optimizer, quantize, clip_latent, diagnostics: as in
      :func:`ste`.
    channel_axis: ``None`` (per tensor) or the axis with its own ``alpha``.
    surrogate: STE surrogate (default identity).

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
      surrogate=surrogate, scale="fit", quantize=quantize,
      channel_axis=channel_axis, clip_latent=clip_latent,
      diagnostics=diagnostics, who="bwn")


def twn(
    learning_rate: Optional[ScalarOrSchedule],
    *,
    optimizer: Optional[optax.GradientTransformation] = None,
    threshold: float = 0.7,
    quantize: selection.Quantize = None,
    channel_axis: Optional[int] = None,
    surrogate: str = "identity",
    clip_latent: Optional[float] = None,
    diagnostics: bool = True,
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
    learning_rate, optimizer, quantize, clip_latent, diagnostics: as in
      :func:`ste`.
    threshold: ``t``.
    channel_axis: ``None`` (per tensor) or the axis with its own
      ``Delta, alpha``.
    surrogate: STE surrogate (default identity).

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
      surrogate=surrogate, scale="twn", threshold=threshold,
      quantize=quantize, channel_axis=channel_axis, clip_latent=clip_latent,
      diagnostics=diagnostics, who="twn")
