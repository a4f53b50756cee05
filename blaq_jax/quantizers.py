"""Straight-through quantizers: forward rules, surrogate gradients, noise.

A straight-through estimator (STE) quantizes the latent weights ``w`` in the
forward pass, ``q = alpha * beta`` with ``beta = nearest_Q(w / alpha)``, and in
the backward pass replaces the (zero almost everywhere) Jacobian of the
rounding by that of a smooth surrogate ``S`` of the normalised latent
``x = w / alpha``:

.. math::

  \\frac{\\partial \\ell}{\\partial w} \\approx
  \\frac{\\partial \\ell}{\\partial q} \\, S'(w / \\alpha),
  \\qquad \\alpha \\text{ treated as a constant.}

=============  =====================================  ===================
surrogate      ``S'(x)``                              ``eps_bar``
=============  =====================================  ===================
identity       ``1``                                  ``1 / (2 sqrt 3)``
hardtanh       ``1[|x| <= 1]``                        ``1 / sqrt 3``
tanh           ``1 - tanh(x)^2``                      ``pi / sqrt 12``
approx_sign    ``max(0, 2 - 2 |x|)`` (Bi-Real Net)    ``1 / sqrt 6``
=============  =====================================  ===================

Each surrogate is the expected quantizer under a noise (Yang & Aamodt 2025):
``S(x) = E[Q(x + eps_bar u)]`` with ``u`` of unit variance drawn from
:func:`sample_noise` (uniform for identity and hardtanh, logistic for tanh,
triangular for ApproxSign), ``eps_bar`` in units of the quantization step.
That is how FOGZO picks its finite-difference step ``eps = step * eps_bar``
and its noise (:mod:`blaq_jax.fogzo`).

The scale ``alpha`` of a tensor (or of each slice along ``channel_axis``) is
given by a *scale rule* (:func:`quantize_latent`):

* ``"fit"``: least squares, ``min ||w - alpha beta||^2`` (the unweighted
  projection of :mod:`blaq_jax.projection`); for the sign quantizer this is
  ``alpha = mean |w|``, the BWN scale.
* ``"twn"``: TWN's rule at ternary leaves, threshold ``delta = t mean |w|``
  (``t = 0.7``), ``alpha`` = mean of ``|w|`` above it; ``"fit"`` elsewhere.
* ``"max"``: ``alpha = max |w|`` (the levels span the latent range).
* a positive float: a fixed scale (BinaryConnect: ``1.0``).

The functions :func:`fake_quantize`, :func:`sign`, :func:`ternary` and
:func:`uniform` carry the STE as a ``jax.custom_vjp`` for models that quantize
their own weights; the transforms of :mod:`blaq_jax.ste` apply the same rule
explicitly to the gradient they receive.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from blaq_jax import quantizers
  >>> w = jnp.array([-1.5, -0.3, 0.2, 0.9])
  >>> quantizers.sign(w, scale=1.0).tolist()
  [-1.0, -1.0, 1.0, 1.0]
  >>> jax.grad(lambda w: quantizers.sign(w, scale=1.0).sum())(w).tolist()
  [0.0, 1.0, 1.0, 1.0]
  >>> round(quantizers.EPS_BAR["hardtanh"] ** 2, 4)  # variance of U[-1, 1]
  0.3333
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from blaq_jax.levels import LevelSet
from blaq_jax.projection import (dequantize, encode, expand_scale, project,
                                 reduce_axes, scale_shape)

SURROGATES = ("identity", "hardtanh", "tanh", "approx_sign")

EPS_BAR = {
    "identity": 1.0 / (2.0 * math.sqrt(3.0)),
    "hardtanh": 1.0 / math.sqrt(3.0),
    "tanh": math.pi / math.sqrt(12.0),
    "approx_sign": 1.0 / math.sqrt(6.0),
}

SCALES = ("fit", "twn", "max")

Scale = Union[str, float]


def check_surrogate(name, where: str = "surrogate") -> str:
  """Returns ``name`` if it is a known surrogate, else raises ValueError."""
  if not isinstance(name, str) or name not in SURROGATES:
    raise ValueError(
        f"Unknown STE surrogate {where}={name!r}; expected one of "
        f"{SURROGATES}.")
  return name


def check_scale(scale, where: str = "scale") -> Scale:
  """Returns a valid scale rule (name or fixed positive float)."""
  if isinstance(scale, str):
    if scale not in SCALES:
      raise ValueError(f"Unknown scale rule {where}={scale!r}; expected one "
                       f"of {SCALES} or a positive float.")
    return scale
  if isinstance(scale, (bool, np.bool_)) or not isinstance(
      scale, (int, float, np.integer, np.floating, jax.Array, np.ndarray)):
    raise TypeError(f"{where} must be one of {SCALES} or a positive float, "
                    f"got {scale!r}.")
  if not isinstance(scale, jax.core.Tracer) and np.ndim(scale) == 0 and not (
      float(scale) > 0):
    raise ValueError(f"A fixed {where} must be positive, got {scale!r}.")
  return scale


def surrogate_grad(name: str, x, scale=None):
  """``S'(x / scale)``: the surrogate's derivative at the normalised latent.

  ``scale`` (positive, broadcastable; None: 1) is divided out only where the
  surrogate needs it: ``identity`` and ``hardtanh`` (``|x| <= scale``) do not
  divide, so a step that reads ``S'`` in several passes writes no ``x /
  scale`` array.
  """
  check_surrogate(name)
  x = jnp.asarray(x)
  if name == "identity":
    return jnp.ones_like(x)
  if name == "hardtanh":
    return (jnp.abs(x) <= (1 if scale is None else scale)).astype(x.dtype)
  if scale is not None:
    x = x / scale
  if name == "tanh":
    return 1 / jnp.cosh(x) ** 2  # = 1 - tanh^2, accurate in the tails
  return jnp.maximum(0.0, 2 - 2 * jnp.abs(x)).astype(x.dtype)


def sample_noise(name: str, key, shape, dtype=jnp.float32):
  """Unit-variance noise whose smoothing of the quantizer gives ``S``.

  identity / hardtanh: uniform on ``[-sqrt 3, sqrt 3]``; tanh: logistic with
  scale ``sqrt 3 / pi``; approx_sign: triangular on ``[-sqrt 6, sqrt 6]``.
  """
  check_surrogate(name)
  if name in ("identity", "hardtanh"):
    r = math.sqrt(3.0)
    return jax.random.uniform(key, shape, dtype, -r, r)
  if name == "tanh":
    return jax.random.logistic(key, shape, dtype) * (math.sqrt(3.0) / math.pi)
  half = math.sqrt(6.0) / 2  # sum of two U[-h, h] is triangular on [-2h, 2h]
  u = jax.random.uniform(key, (2,) + tuple(shape), dtype, -half, half)
  return u[0] + u[1]


def step_size(alpha, level_set: LevelSet):
  """The quantization step: ``alpha`` times the smallest positive level."""
  values = level_set.values
  return alpha * float(np.min(values[values > 0]))


def _ternary(level_set: LevelSet) -> bool:
  return level_set.kind == "linear" and level_set.bits == 2


def quantize_latent(w, level_set: LevelSet, scale: Scale = "fit", *,
                    channel_axis: Optional[int] = None, threshold=0.7,
                    prev_codes=None, prev_alpha=None, tol: float = 1e-6,
                    max_iter: int = 20):
  """Scale ``alpha`` and codes of ``w`` under a scale rule (module doc).

  Args:
    w: latent weights.
    level_set: the level set of ``beta``.
    scale: ``"fit"``, ``"twn"``, ``"max"`` or a fixed positive float.
    channel_axis: ``None`` for one scale per tensor, else the scaled axis.
    threshold: TWN's ``t`` in ``delta = t mean |w|`` (``"twn"`` only).
    prev_codes, prev_alpha: the previous quantization (warm start of
      ``"fit"``; ``prev_alpha`` is also the fallback scale of an all-zero
      slice, else 1).
    tol, max_iter: ``"fit"``'s convergence tolerance and round cap.

  Returns:
    ``(alpha, codes)`` as :func:`blaq_jax.projection.project` returns them.
  """
  alpha, unit = latent_scale(w, level_set, scale, channel_axis=channel_axis,
                             threshold=threshold, prev_codes=prev_codes,
                             prev_alpha=prev_alpha, tol=tol, max_iter=max_iter)
  return alpha, encode(w, alpha, level_set, channel_axis, unit)


def latent_scale(w, level_set: LevelSet, scale: Scale = "fit", *,
                 channel_axis: Optional[int] = None, threshold=0.7,
                 prev_codes=None, prev_alpha=None, tol: float = 1e-6,
                 max_iter: int = 20):
  """:func:`quantize_latent`'s ``(alpha, unit)``: codes ``encode(w, alpha,
  level_set, channel_axis, unit)``; ``unit`` is None (= ``alpha``) except
  for TWN, whose zero band ``|w| <= delta`` is ``nearest(w / 2 delta) = 0``.
  """
  scale = check_scale(scale)
  w = jnp.asarray(w, jnp.float32)
  sshape = scale_shape(w.shape, channel_axis)
  fallback = (jnp.ones(sshape, jnp.float32) if prev_alpha is None
              else jnp.asarray(prev_alpha, jnp.float32))
  axes = reduce_axes(w.ndim, channel_axis)

  def positive_or_fallback(alpha):
    return jnp.where(alpha > 0, alpha, fallback)

  if not isinstance(scale, str):
    return jnp.broadcast_to(jnp.asarray(scale, jnp.float32), sshape), None
  if scale == "max":
    return positive_or_fallback(jnp.max(jnp.abs(w), axis=axes)), None
  if scale == "twn" and _ternary(level_set):
    delta = threshold * jnp.mean(jnp.abs(w), axis=axes)
    unit = jnp.where(delta > 0, 2 * delta, 1.0)  # delta = 0: w is all zero
    above = encode(w, None, level_set, channel_axis, unit) != level_set.codes(
        jnp.zeros([], jnp.float32))
    n = jnp.sum(above, axis=axes)
    alpha = positive_or_fallback(
        jnp.sum(jnp.where(above, jnp.abs(w), 0.0), axis=axes) /
        jnp.maximum(n, 1))
    return alpha, unit
  # "fit", and "twn" at leaves that are not ternary
  alpha, _ = project(w, jnp.ones_like(w), level_set, channel_axis=channel_axis,
                     prev_codes=prev_codes, prev_alpha=prev_alpha, tol=tol,
                     max_iter=max_iter)
  return alpha, None


# --- quantizers with a custom VJP, for use inside a model --------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _fake_quantize(w, level_set, scale, surrogate, channel_axis, threshold):
  alpha, codes = quantize_latent(w, level_set, scale,
                                 channel_axis=channel_axis,
                                 threshold=threshold)
  return dequantize(alpha, codes, level_set, channel_axis, w.dtype)


def _fake_quantize_fwd(w, level_set, scale, surrogate, channel_axis,
                       threshold):
  alpha, codes = quantize_latent(w, level_set, scale,
                                 channel_axis=channel_axis,
                                 threshold=threshold)
  a = expand_scale(alpha, w.ndim, channel_axis)
  q = (a * level_set.decode(codes, jnp.float32)).astype(w.dtype)
  return q, surrogate_grad(surrogate, w.astype(jnp.float32), a)


def _fake_quantize_bwd(level_set, scale, surrogate, channel_axis, threshold,
                       ds, g):
  del level_set, scale, surrogate, channel_axis, threshold
  return ((g * ds).astype(g.dtype),)


_fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


def fake_quantize(w, level_set: LevelSet, *, scale: Scale = "fit",
                  surrogate: str = "identity",
                  channel_axis: Optional[int] = None, threshold: float = 0.7):
  """``alpha * nearest_Q(w / alpha)`` forward, ``g * S'(w / alpha)`` backward.

  The scale is computed from ``w`` by the rule ``scale`` and treated as a
  constant in the backward pass (no gradient flows through it).

  Args:
    w: latent weights (any float dtype; the output has the same dtype).
    level_set: the :class:`~blaq_jax.levels.LevelSet` of ``beta``.
    scale: scale rule, see :func:`quantize_latent`.
    surrogate: one of :data:`SURROGATES`.
    channel_axis: ``None`` or the axis with its own scale.
    threshold: TWN's threshold factor (``scale="twn"``).

  Returns:
    The quantized weights, on the level set ``alpha * Q``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from blaq_jax.levels import LevelSet
    >>> from blaq_jax.quantizers import fake_quantize
    >>> w = jnp.array([-0.8, -0.1, 0.3, 0.6])
    >>> q = fake_quantize(w, LevelSet("linear", 2), scale=1.0)
    >>> q.tolist()
    [-1.0, 0.0, 0.0, 1.0]
    >>> jax.grad(lambda w: fake_quantize(w, LevelSet("linear", 2),
    ...          scale=1.0, surrogate="tanh").sum())(jnp.zeros(2)).tolist()
    [1.0, 1.0]
  """
  check_surrogate(surrogate)
  scale = check_scale(scale)
  if not isinstance(scale, str):
    scale = float(scale)  # hashable, static
  return _fake_quantize(jnp.asarray(w), level_set, scale, surrogate,
                        channel_axis, float(threshold))


def sign(w, *, surrogate: str = "hardtanh", scale: Scale = "fit",
         channel_axis: Optional[int] = None):
  """Binary ``alpha * sign(w)`` (sign(0) = +1) with an STE.

  ``scale=1.0`` with the default hardtanh surrogate is BinaryConnect's
  quantizer; ``scale="fit"`` (``alpha = mean |w|``) is BWN's.
  """
  return fake_quantize(w, LevelSet("blaq", 1), scale=scale,
                       surrogate=surrogate, channel_axis=channel_axis)


def ternary(w, *, surrogate: str = "identity", scale: Scale = "twn",
            threshold: float = 0.7, channel_axis: Optional[int] = None):
  """Ternary ``alpha * {-1, 0, 1}`` with an STE (default: TWN's rule)."""
  return fake_quantize(w, LevelSet("linear", 2), scale=scale,
                       surrogate=surrogate, channel_axis=channel_axis,
                       threshold=threshold)


def uniform(w, bits: int, *, surrogate: str = "identity",
            scale: Scale = "fit", level_set: str = "linear",
            channel_axis: Optional[int] = None):
  """k-bit uniform quantizer with an STE.

  ``level_set="linear"`` (default) is the symmetric mid-tread grid
  ``{j / n : j = -n..n}``, ``n = 2^(k-1) - 1`` (``2^k - 1`` levels, zero
  included; 2 bits is ternary). ``bits=1`` is :func:`sign`.
  """
  ls = LevelSet("blaq", 1) if bits == 1 else LevelSet(level_set, bits)
  return fake_quantize(w, ls, scale=scale, surrogate=surrogate,
                       channel_axis=channel_axis)
