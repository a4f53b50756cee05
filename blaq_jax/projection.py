"""D-weighted projection onto ``{alpha * beta : alpha > 0, beta in Q^n}``.

Algorithm 2 of the BLAQ appendix. For latent weights ``w`` and a positive
diagonal curvature ``d`` it solves

.. math::

  \\min_{\\alpha > 0,\\ \\beta \\in Q^n} \\sum_i d_i (w_i - \\alpha \\beta_i)^2 .

* Binary ``Q = {-1, +1}``: exact in one pass, ``beta = sign(w)`` (sign(0) = +1)
  and ``alpha = sum(d |w|) / sum(d)``.
* Otherwise alternate ``alpha = sum(d beta w) / sum(d beta^2)`` and
  ``beta = nearest_Q(w / alpha)`` until ``|alpha - alpha_old| < tol`` or
  ``max_iter`` rounds. Because ``beta`` is a closed-form function of
  ``w / alpha``, the loop carries only ``alpha``: each round is one fused
  reduction over ``(w, d)``, and the codes are written once at the end.
  ``beta`` starts from the previous step's codes (warm start) when given.

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
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from blaq_jax.levels import LevelSet


def _reduce_axes(ndim: int, channel_axis: Optional[int]):
  if channel_axis is None or ndim == 0:
    return tuple(range(ndim))
  ax = channel_axis % ndim
  return tuple(i for i in range(ndim) if i != ax)


def scale_shape(shape, channel_axis: Optional[int]):
  """Shape of ``alpha`` for a tensor of ``shape`` (``()`` for per-tensor)."""
  if channel_axis is None or len(shape) == 0:
    return ()
  return (shape[channel_axis % len(shape)],)


def _expand(alpha, ndim: int, channel_axis: Optional[int]):
  """Broadcasts alpha (``()`` or ``(C,)``) against a tensor of rank ``ndim``."""
  if alpha.ndim == 0:
    return alpha
  shape = [1] * ndim
  shape[channel_axis % ndim] = alpha.shape[0]
  return alpha.reshape(shape)


def dequantize(alpha, codes, level_set: LevelSet, channel_axis=None,
               dtype=jnp.float32):
  """``q = alpha * beta(codes)`` with ``alpha`` broadcast along the channel."""
  beta = level_set.decode(codes, jnp.float32)
  a = _expand(alpha.astype(jnp.float32), codes.ndim, channel_axis)
  return (a * beta).astype(dtype)


def project(w, d, level_set: LevelSet, *, channel_axis: Optional[int] = None,
            prev_codes=None, prev_alpha=None, tol: float = 1e-6,
            max_iter: int = 20):
  """Projects ``w`` onto the scaled level set, weighting errors by ``d``.

  Args:
    w: latent weights (any float dtype; computed in float32).
    d: positive diagonal curvature of the same shape as ``w``.
    level_set: the :class:`~blaq_jax.levels.LevelSet` of ``beta``.
    channel_axis: ``None`` for one scale per tensor, else the axis that gets
      its own scale (``-1``: the output axis of Flax kernels).
    prev_codes: codes of the previous projection, used to warm-start ``beta``.
      Without them ``beta`` starts from ``nearest(w / max|w|)``.
    prev_alpha: returned where a slice is all-zero (``sum(d beta^2) = 0``),
      which keeps ``alpha`` finite; defaults to 1.
    tol: stop when ``|alpha - alpha_old| < tol`` for every scale.
    max_iter: cap on the alternating rounds (the first round is always run).

  Returns:
    ``(alpha, codes)``: float32 scales of shape ``scale_shape(w.shape, ...)``
    and uint8 codes of ``w.shape``.
  """
  w = jnp.asarray(w, jnp.float32)
  d = jnp.asarray(d, jnp.float32)
  axes = _reduce_axes(w.ndim, channel_axis)
  sshape = scale_shape(w.shape, channel_axis)
  fallback = (jnp.ones(sshape, jnp.float32) if prev_alpha is None
              else jnp.asarray(prev_alpha, jnp.float32))

  def safe_ratio(num, den):
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), fallback)

  if level_set.kind == "blaq" and level_set.bits == 1:
    alpha = safe_ratio(jnp.sum(d * jnp.abs(w), axes), jnp.sum(d, axes))
    return alpha, level_set.codes(w)

  def alpha_for(beta):
    return safe_ratio(jnp.sum(d * beta * w, axes),
                      jnp.sum(d * beta * beta, axes))

  if prev_codes is not None:
    beta0 = level_set.decode(prev_codes)
  else:
    wmax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    beta0 = level_set.nearest(w / jnp.where(wmax > 0, wmax, 1.0))
  alpha0 = alpha_for(beta0)

  def beta_at(alpha):
    # alpha > 0 always (ratio of positive sums, or the positive fallback).
    return level_set.nearest(w / _expand(alpha, w.ndim, channel_axis))

  def cond(carry):
    i, alpha, prev = carry
    return jnp.logical_and(i < max_iter, jnp.any(jnp.abs(alpha - prev) >= tol))

  def body(carry):
    i, alpha, _ = carry
    return i + 1, alpha_for(beta_at(alpha)), alpha

  alpha1 = alpha_for(beta_at(alpha0))
  _, alpha, _ = jax.lax.while_loop(cond, body, (1, alpha1, alpha0))
  return alpha, level_set.codes(w / _expand(alpha, w.ndim, channel_axis))
