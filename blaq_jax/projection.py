"""D-weighted projection onto ``{alpha * beta : alpha > 0, beta in Q^n}``.

Algorithm 2 of the BLAQ appendix. For latent weights ``w`` and a positive
diagonal curvature ``d`` it solves

.. math::

  \\min_{\\alpha > 0,\\ \\beta \\in Q^n} \\sum_i d_i (w_i - \\alpha \\beta_i)^2 .

* Binary ``Q = {-1, +1}``: exact in one pass, ``beta = sign(w)`` (sign(0) = +1)
  and ``alpha = sum(d |w|) / sum(d)``.
* Otherwise alternate ``beta = nearest_Q(w / alpha)`` and
  ``alpha = sum(d beta w) / sum(d beta^2)``. Because ``beta`` is a
  closed-form function of ``w / alpha``, only ``alpha`` is carried: each
  round is one fused pass over ``(w, d)`` that forms both sums, and the codes
  are those of the final scale, ``codes = nearest_Q(w / alpha)``
  (:func:`encode`; the ``beta`` half-step of one more round, so never worse
  than the last round).
  Every round lowers the objective (or keeps it), from any start.

  - ``tol > 0`` (the default): rounds until ``|alpha - alpha_old| < tol`` or
    ``max_iter`` rounds, in a ``while_loop`` (the exact fixed point, as
    before), starting from ``prev_codes`` when given.
  - ``tol=None``: exactly ``max_iter`` rounds, unrolled, with no
    data-dependent control flow (the cheap per-step scheme: no host round
    trip on an accelerator, a fixed number of passes). It starts from
    ``start_alpha`` (e.g. :func:`~blaq_jax.projection.extrapolate` of the
    last two scales), else from ``prev_alpha`` (the last step's scale), else
    from the closed-form guess ``gaussian_scale(Q) * sqrt(sum(d w^2) /
    sum(d))`` (the scale that is optimal if ``w`` were Gaussian; one extra
    pass). From the third
    round on, every third round starts from the Aitken extrapolation of the
    last three scales, and the best round is kept (its error
    ``sum(d w^2) - S1^2 / S2`` needs no extra sum); one or two rounds are
    the plain alternation.

With ``channel_axis`` set, ``alpha`` has one entry per slice of that axis and
all sums run over the other axes (per-output-channel scaling).

Example:
  >>> import jax.numpy as jnp
  >>> from blaq_jax.levels import LevelSet
  >>> from blaq_jax.projection import project
  >>> w = jnp.array([0.3, -0.1, 0.2, -0.4])
  >>> alpha, codes = project(w, jnp.ones_like(w), LevelSet("blaq", 1))
  >>> round(float(alpha), 4), codes.tolist()
  (0.25, [1, 0, 1, 0])
  >>> # 2 bits, two fixed rounds from the last scale 0.3: beta = nearest(w /
  >>> # 0.3) = [1, -1/2, 1/2, -1], alpha = sum(beta w) / sum(beta^2) = .85/2.5
  >>> alpha, codes = project(w, jnp.ones_like(w), LevelSet("blaq", 2),
  ...                        prev_alpha=jnp.array(0.3), tol=None, max_iter=2)
  >>> round(float(alpha), 4), codes.tolist()
  (0.34, [3, 1, 2, 0])
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from blaq_jax.levels import LevelSet, gaussian_scale

# The block of fused_sums' partial sums, and the block for a weight formed
# from several arrays inside the sums (three or four inputs: see project's
# sum_block).
SUM_BLOCK = 16
BLENDED_SUM_BLOCK = 8


def reduce_axes(ndim: int, channel_axis: Optional[int]):
  """The axes a scale sums over: all, or all but ``channel_axis``."""
  if channel_axis is None or ndim == 0:
    return tuple(range(ndim))
  ax = channel_axis % ndim
  return tuple(i for i in range(ndim) if i != ax)


def scale_shape(shape, channel_axis: Optional[int]):
  """Shape of ``alpha`` for a tensor of ``shape`` (``()`` for per-tensor)."""
  if channel_axis is None or len(shape) == 0:
    return ()
  return (shape[channel_axis % len(shape)],)


def expand_scale(alpha, ndim: int, channel_axis: Optional[int]):
  """Broadcasts alpha (``()`` or ``(C,)``) against a tensor of rank ``ndim``."""
  if alpha.ndim == 0:
    return alpha
  shape = [1] * ndim
  shape[channel_axis % ndim] = alpha.shape[0]
  return alpha.reshape(shape)


def dequantize(alpha, codes, level_set: LevelSet, channel_axis=None,
               dtype=jnp.float32):
  """``q = alpha * beta(codes)`` with ``alpha`` broadcast along the channel."""
  return alpha_times(alpha, level_set.decode(codes, jnp.float32),
                     channel_axis, dtype)


def alpha_times(alpha, beta, channel_axis, dtype):
  """``alpha * beta`` in float32, ``alpha`` broadcast along the channel."""
  a = expand_scale(jnp.asarray(alpha, jnp.float32), beta.ndim, channel_axis)
  return (a * beta).astype(dtype)


def encode(w, alpha, level_set: LevelSet, channel_axis=None, unit=None):
  """Codes of the levels nearest to ``w / unit`` (``unit``: ``alpha`` if None).

  The codes the projection returns for ``w`` and its ``alpha``, so a state
  need not store them: they follow from the latent weights and the scale.
  At 1 bit they are the sign of ``w`` (no division: ``w / alpha`` can
  underflow to ``-0``). ``unit`` serves rules whose codes are not the
  nearest levels of ``w / alpha`` (TWN's threshold: ``unit = 2 delta``).

  Example:
    >>> import jax.numpy as jnp
    >>> from blaq_jax.levels import LevelSet
    >>> w = jnp.array([0.3, -0.1, 0.2, -0.4])
    >>> encode(w, jnp.array(0.34), LevelSet("blaq", 2)).tolist()
    [3, 1, 2, 0]
  """
  return level_set.codes(_in_units(w, alpha, level_set, channel_axis, unit))


def nearest_levels(w, alpha, level_set: LevelSet, channel_axis=None,
                   unit=None):
  """The levels ``beta`` (float32) whose codes :func:`encode` gives.

  ``decode(encode(w, ...))`` without the integer codes in between (the
  quantized update ``alpha * beta`` reads only ``w``).

  Example:
    >>> import jax.numpy as jnp
    >>> from blaq_jax.levels import LevelSet
    >>> w = jnp.array([0.3, -0.1, 0.2, -0.4])
    >>> nearest_levels(w, jnp.array(0.34), LevelSet("blaq", 2)).tolist()
    [1.0, -0.5, 0.5, -1.0]
  """
  return level_set.nearest(_in_units(w, alpha, level_set, channel_axis, unit))


def _in_units(w, alpha, level_set, channel_axis, unit):
  """``w / unit`` (``unit``: ``alpha`` if None) in float32; ``w`` at 1 bit."""
  w = jnp.asarray(w, jnp.float32)
  if level_set.kind == "blaq" and level_set.bits == 1:
    return w
  u = jnp.asarray(alpha if unit is None else unit, jnp.float32)
  return w / expand_scale(u, w.ndim, channel_axis)


def extrapolate(alpha, alpha_before):
  """A start for the next projection from the last two scales.

  ``alpha + (alpha - alpha_before)``, kept in ``[alpha / 2, 2 alpha]`` (so
  positive). Pass it to :func:`~blaq_jax.projection.project` as ``start_alpha``.

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(extrapolate(jnp.array(0.5), jnp.array(0.4))), 4)
    0.6
  """
  alpha = jnp.asarray(alpha, jnp.float32)
  guess = 2 * alpha - jnp.asarray(alpha_before, jnp.float32)
  return jnp.clip(guess, alpha / 2, 2 * alpha)


def fused_sums(terms, axes, block: int = SUM_BLOCK):
  """``[sum(t, axes) for t in terms]`` in one pass over their inputs.

  For a per-tensor sum of a tensor of rank >= 2 the terms are reduced
  together by one variadic ``lax.reduce``, into which XLA fuses their
  producers (``d * beta * w`` and ``d * beta^2`` are never written to
  memory). The first axis that ``block`` divides (of size ``n > block``)
  is split into ``(n / block, block)`` and the reduction runs over the
  ``block`` axis only: each partial sum adds ``block`` entries, so the loop
  over the partials (``1 / block`` of the tensor) is an elementwise loop that
  XLA:CPU vectorises and splits over its threads, about 3x faster than a
  reduction along a long axis (a serial add chain per output). The partials
  are then added by one ``jnp.sum`` per term. No add chain runs over millions
  of entries (one such chain loses ~1e-3 relative). A tensor sharded along
  the split axis keeps its sharding on the ``n / block`` part (when the
  shard count divides it), so only the partials' sums cross devices. A
  tensor with no such axis is reduced whole in one pass; per-channel sums
  and vectors use one ``jnp.sum`` per term.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(6.0).reshape(2, 3)
    >>> [float(s) for s in fused_sums([x, x * x], (0, 1))]
    [15.0, 55.0]
  """
  terms = [jnp.asarray(t, jnp.float32) for t in terms]
  ndim = terms[0].ndim
  shape = terms[0].shape
  if ndim < 2 or tuple(axes) != tuple(range(ndim)):
    return [jnp.sum(t, axes) for t in terms]
  a = next((a for a in range(ndim) if shape[a] % block == 0
            and shape[a] > block), None)
  if a is not None:
    terms = [t.reshape(shape[:a] + (shape[a] // block, block)
                       + shape[a + 1:]) for t in terms]
    reduced = (a + 1,)
  else:  # small odd shapes: one reduction over everything
    reduced = tuple(range(ndim))
  zeros = tuple(jnp.zeros([], jnp.float32) for _ in terms)
  parts = jax.lax.reduce(tuple(terms), zeros,
                         lambda x, y: tuple(u + v for u, v in zip(x, y)),
                         reduced)
  return [jnp.sum(p) for p in parts]


def project(w, d, level_set: LevelSet, *, channel_axis: Optional[int] = None,
            prev_codes=None, prev_alpha=None, tol: Optional[float] = 1e-6,
            max_iter: int = 20, start_alpha=None, eps=0.0,
            sum_block: int = SUM_BLOCK):
  """Projects ``w`` onto the scaled level set, weighting errors by ``d + eps``.

  Args:
    w: latent weights (any float dtype; computed in float32), or a callable
      returning them, called once per pass (BLAQ's trial point ``w*``, a
      step from ``w_t`` that the sums then form from its inputs instead of
      reading it written out).
    d: positive diagonal curvature of the same shape as ``w``, or a
      callable returning it, called once per pass over ``w``: a weight with
      a costly formula (BLAQ's ``D_bar``, a square root per entry) is then
      formed inside each pass instead of written to memory once and read
      back (see ``sum_block``).
    level_set: the :class:`~blaq_jax.levels.LevelSet` of ``beta``.
    channel_axis: ``None`` for one scale per tensor, else the axis that gets
      its own scale (``-1``: the output axis of Flax kernels).
    prev_codes: codes of the previous projection; with ``tol > 0`` they
      warm-start ``beta`` (without them ``beta`` starts from
      ``nearest(w / max|w|)``). Not read with ``tol=None``.
    prev_alpha: the previous scale. Returned where a slice is all-zero
      (``sum(d beta^2) = 0``), which keeps ``alpha`` finite (default 1);
      with ``tol=None`` also the start of the rounds.
    tol: ``> 0``: stop when ``|alpha - alpha_old| < tol`` for every scale.
      ``None``: run exactly ``max_iter`` rounds (no ``while_loop``).
    max_iter: with ``tol > 0`` the cap on the rounds (the first round is
      always run); with ``tol=None`` the number of rounds (a static int
      ``>= 1``).
    start_alpha: with ``tol=None``, the scale the rounds start from (e.g.
      :func:`~blaq_jax.projection.extrapolate` of the last two scales);
      overrides ``prev_alpha`` as the start.
    eps: a constant added to every weight (LAQ's ``D`` is proportional to
      ``sqrt(v) + eps sqrt(1 - b2^t)``). At 1 bit it enters ``sum(d + eps)``
      in closed form, so no weight array is formed.
    sum_block: the ``block`` of the sums' :func:`fused_sums`. Where ``d`` is
      formed inside the sums from several arrays (BLAQ's active step),
      ``BLENDED_SUM_BLOCK`` (8) rather than ``SUM_BLOCK`` (16): each input
      of the fused reduction is ``block`` memory streams a row apart, and on
      an AMD EPYC host three inputs in blocks of 16 (48 streams) ran
      4.5-5.7x slower than in blocks of 8 (``experiments/bench/README.md``,
      "The weight blended inside the sums").

  Returns:
    ``(alpha, codes)``: float32 scales of shape ``scale_shape(w.shape, ...)``
    and uint8 codes of ``w.shape``.
  """
  if tol is not None and not isinstance(tol, jax.core.Tracer) and not (
      np.ndim(tol) == 0 and float(tol) >= 0):
    raise ValueError(f"project: tol must be None (fixed rounds) or >= 0, got "
                     f"{tol!r}.")
  if tol is None and (isinstance(max_iter, (bool, np.bool_, jax.Array))
                      or not isinstance(max_iter, (int, np.integer))
                      or max_iter < 1):
    raise ValueError(
        "project: with tol=None, max_iter is the number of rounds and must "
        f"be a static int >= 1, got {max_iter!r} (under "
        "optax.inject_hyperparams pass it in static_args).")

  def latent():  # w in float32; a callable w is called anew for each pass
    return jnp.asarray(w() if callable(w) else w, jnp.float32)

  def weight():  # likewise d
    return jnp.asarray(d() if callable(d) else d, jnp.float32)

  first = latent()  # the first pass's w (in rounds from a scale, only
  # its shape is read: XLA drops it)

  axes = reduce_axes(first.ndim, channel_axis)
  sshape = scale_shape(first.shape, channel_axis)
  fallback = (jnp.ones(sshape, jnp.float32) if prev_alpha is None
              else jnp.asarray(prev_alpha, jnp.float32))

  def safe_ratio(num, den):
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), fallback)

  no_eps = isinstance(eps, (int, float)) and eps == 0
  if level_set.kind == "blaq" and level_set.bits == 1:
    # One pass over (w, d) (max(w, -w) is |w|); the constant eps is added
    # to sum(d) in closed form.
    if isinstance(eps, jax.Array):
      # XLA:CPU shares one broadcast of a traced scalar among same-shaped
      # leaves and then writes it out in full for their reductions; tied
      # to this leaf's scale (positive, finite) it stays inside its sum.
      eps = eps + 0 * jnp.max(fallback)
    d1 = weight()
    s1, s2 = fused_sums([(d1 + eps) * jnp.maximum(first, -first), d1], axes,
                        sum_block)
    if not no_eps:
      s2 = s2 + eps * int(np.prod([first.shape[a] for a in axes]))
    return safe_ratio(s1, s2), encode(latent(), None, level_set)

  def weight_eps():  # d + eps, formed anew for each pass
    return weight() if no_eps else weight() + eps

  # The rounds reduce magnitudes: d |beta| |w| = d beta w and d |beta|^2 =
  # d beta^2 exactly (the sets are symmetric and beta has the sign of w),
  # and |beta| of one threshold is a comparison (LevelSet.magnitude).
  def sums(x, m):  # S1 = sum(d |beta| |w|), S2 = sum(d |beta|^2), one pass
    dm = weight_eps() * m
    return fused_sums([dm * jnp.abs(x), dm * m], axes, sum_block)

  def round_sums(alpha):
    x = latent()
    return sums(x, level_set.magnitude(
        jnp.abs(x / expand_scale(alpha, x.ndim, channel_axis))))

  if tol is None:
    if start_alpha is not None:
      alpha = jnp.broadcast_to(jnp.asarray(start_alpha, jnp.float32), sshape)
    elif prev_alpha is not None:
      alpha = fallback
    else:
      alpha = initial_scale(first, weight_eps(), level_set,
                            channel_axis=channel_axis)
    alpha = _fixed_rounds(alpha, int(max_iter), round_sums, safe_ratio)
    return alpha, encode(latent(), alpha, level_set, channel_axis)

  if prev_codes is not None:  # signed: the last codes' signs may differ
    beta0 = level_set.decode(prev_codes)
    db = weight_eps() * beta0
    alpha0 = safe_ratio(*fused_sums([db * first, db * beta0], axes,
                                    sum_block))
  else:
    wmax = jnp.max(jnp.abs(first), axis=axes, keepdims=True)
    x = latent()
    alpha0 = safe_ratio(*sums(x, level_set.magnitude(
        jnp.abs(x) / jnp.where(wmax > 0, wmax, 1.0))))

  def cond(carry):
    i, alpha, prev = carry
    return jnp.logical_and(i < max_iter, jnp.any(jnp.abs(alpha - prev) >= tol))

  def body(carry):
    i, alpha, _ = carry
    return i + 1, safe_ratio(*round_sums(alpha)), alpha

  alpha1 = safe_ratio(*round_sums(alpha0))
  _, alpha, _ = jax.lax.while_loop(cond, body, (1, alpha1, alpha0))
  return alpha, encode(latent(), alpha, level_set, channel_axis)


def _aitken(x0, x1, x2):
  """Aitken's extrapolation of ``x0, x1 = F(x0), x2 = F(x1)`` (else x2)."""
  den = x2 - 2 * x1 + x0
  ok = den != 0
  guess = x0 - (x1 - x0) ** 2 / jnp.where(ok, den, 1.0)
  ok = ok & jnp.isfinite(guess) & (guess > x2 / 2) & (guess < 2 * x2)
  return jnp.where(ok, guess, x2)


def _fixed_rounds(alpha, rounds, round_sums, safe_ratio):
  """``rounds`` alternations from ``alpha``, unrolled (see :func:`project`).

  Round ``r`` evaluates ``beta_r = nearest(w / a_r)`` and, in one pass
  (``round_sums``), ``S1 = sum(d beta_r w)``, ``S2 = sum(d beta_r^2)``: its
  candidate ``alpha_r = S1 / S2`` has error ``sum(d w^2) - S1^2 / S2``, so
  the candidate with the largest gain ``S1^2 / S2`` is the best (ties: the
  later one).
  After every two rounds the next round starts from the Aitken extrapolation
  of the last three scales (kept within a factor 2), which speeds up the
  linear convergence of the alternation. Returned: the last plain round
  before the first extrapolation, or a later round with a larger gain; so
  never worse (in that error, up to float32 round-off of the gains) than the
  first two plain rounds, and with ``rounds <= 2`` the plain alternation.
  """
  best, best_gain, hist, extrapolated = alpha, None, [alpha], False
  for r in range(rounds):
    s1, s2 = round_sums(alpha)
    new = safe_ratio(s1, s2)
    gain = jnp.where(s2 > 0, s1 * new, -jnp.inf)  # = S1^2 / S2
    if not extrapolated:  # plain rounds only descend: the last is the best
      best, best_gain = new, gain
    else:
      later = gain >= best_gain
      best = jnp.where(later, new, best)
      best_gain = jnp.where(later, gain, best_gain)
    hist.append(new)
    alpha = new
    if len(hist) == 3 and r < rounds - 1:
      alpha, extrapolated = _aitken(*hist), True
      hist = [alpha]
  return best


def initial_scale(w, d, level_set: LevelSet, *, channel_axis=None):
  """A closed-form start for the rounds when no previous scale is known.

  ``gaussian_scale(Q) * sqrt(sum(d w^2) / sum(d))``: the optimal scale of a
  Gaussian tensor with the same D-weighted RMS (one pass over ``w, d``). An
  all-zero slice gets 1.

  Example:
    >>> import jax.numpy as jnp
    >>> from blaq_jax.levels import LevelSet
    >>> w = jnp.array([1.0, -1.0, 1.0, -1.0])
    >>> round(float(initial_scale(w, jnp.ones(4), LevelSet("blaq", 2))), 3)
    1.302
  """
  w = jnp.asarray(w, jnp.float32)
  d = jnp.asarray(d, jnp.float32)
  axes = reduce_axes(w.ndim, channel_axis)
  s2, sd = fused_sums([d * w * w, d], axes)
  rms = jnp.sqrt(s2 / jnp.where(sd > 0, sd, 1.0))
  return jnp.where(rms > 0, gaussian_scale(level_set) * rms, 1.0)
