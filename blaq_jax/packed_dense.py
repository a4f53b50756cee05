"""Dense layers that compute from packed low-bit weights.

Two ways to run ``y = x W`` with ``W = alpha * Q[codes]`` stored packed
(:mod:`blaq_jax.packing`, the layout of :func:`blaq_jax.export`):

* :func:`unpack_dense`: unpack the codes and decode ``W`` inside the jitted
  computation, then a float matmul. Any bit width and level set; the
  resident weight is the packed bytes (``k / 32`` of float32), the float
  ``W`` exists only as a temporary of the call.
* :func:`xnor_dense` (1 bit, binarized inputs): with ``s = sign(x)`` and
  ``b = sign(W)`` packed 32 to a word along the input axis,

  .. math::

    (s^\\top b)_o = n - 2\\,\\operatorname{popcount}(s \\oplus b_o),
    \\qquad y_o = \\alpha_o \\,(s^\\top b)_o ,

  integer work only (XNOR-Net). It needs the weights re-laid out per output
  (:func:`xnor_weights`) and inputs packed by :func:`pack_signs`.

``experiments/bench/packed_dense.py`` measures both against the float matmul.

Example:
  >>> import jax.numpy as jnp, numpy as np
  >>> from blaq_jax.levels import LevelSet
  >>> from blaq_jax.packing import pack_bits
  >>> from blaq_jax.packed_dense import (unpack_dense, xnor_dense,
  ...                                    xnor_weights, pack_signs)
  >>> codes = np.array([[1, 0], [0, 0], [1, 1]], np.uint8)  # W = sign, 3x2
  >>> w = np.where(codes == 1, 1.0, -1.0).astype(np.float32)
  >>> x = np.array([[0.5, -2.0, 1.0]], np.float32)
  >>> packed, alpha = pack_bits(codes, 1), np.float32(0.5)
  >>> unpack_dense(x, packed, alpha, LevelSet("blaq", 1), (3, 2)).tolist()
  [[1.75, 1.25]]
  >>> ww = xnor_weights(packed, (3, 2))
  >>> xnor_dense(pack_signs(x), ww, 3, alpha).tolist()  # sign(x) @ (0.5 w)
  [[1.5, 0.5]]
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from blaq_jax import packing
from blaq_jax.levels import LevelSet
from blaq_jax.projection import dequantize

_WORD = 32


def unpack_dense(x, packed, alpha, level_set: LevelSet, shape, *,
                 channel_axis: Optional[int] = None, bias=None):
  """``x @ W`` with ``W = alpha * Q[codes]`` unpacked on the fly.

  Args:
    x: inputs ``[..., n_in]``.
    packed: 1-D ``uint8`` codes of the ``(n_in, n_out)`` kernel
      (:func:`blaq_jax.packing.pack_bits` layout).
    alpha: scale ``()`` or ``(n_out,)`` (with ``channel_axis=-1``).
    level_set: the codes' :class:`~blaq_jax.levels.LevelSet` (static).
    shape: ``(n_in, n_out)`` (static).
    channel_axis: as in the optimizer (``None`` or ``-1``/``1``).
    bias: optional ``[n_out]``.

  Returns:
    ``[..., n_out]`` in ``x``'s dtype; ``W`` is decoded exactly as
    :meth:`blaq_jax.state.QuantizedTensor.dequantize` decodes it.
  """
  n_in, n_out = (int(s) for s in shape)
  codes = packing.unpack_bits_jnp(packed, level_set.bits, n_in * n_out)
  w = dequantize(jnp.asarray(alpha), codes.reshape(n_in, n_out), level_set,
                 channel_axis, jnp.asarray(x).dtype)
  y = x @ w
  return y if bias is None else y + bias


def _pack_rows(bits01):
  """``[..., n]`` of 0/1 -> ``[..., ceil(n / 32)]`` uint32 (bit i of word j
  is entry ``32 j + i``; the padding bits are 0)."""
  n = bits01.shape[-1]
  pad = (-n) % _WORD
  b = jnp.pad(bits01.astype(jnp.uint32),
              [(0, 0)] * (bits01.ndim - 1) + [(0, pad)])
  b = b.reshape(*b.shape[:-1], -1, _WORD)
  return jnp.sum(b << jnp.arange(_WORD, dtype=jnp.uint32), axis=-1,
                 dtype=jnp.uint32)


def pack_signs(x):
  """Binarizes ``x`` (``x >= 0`` -> bit 1 = +1) and packs 32 per uint32."""
  return _pack_rows(jnp.asarray(x) >= 0)


def xnor_weights(packed, shape):
  """1-bit codes of an ``(n_in, n_out)`` kernel -> ``[n_out, ceil(n_in/32)]``.

  Re-lays out the export's packing (C order, output axis fastest) per output
  column along the input axis, the layout :func:`xnor_dense` reads.
  """
  n_in, n_out = (int(s) for s in shape)
  codes = packing.unpack_bits_jnp(packed, 1, n_in * n_out)
  return _pack_rows(codes.reshape(n_in, n_out).T)


def xnor_dense(x_words, w_words, n_in: int, alpha, bias=None):
  """``sign(x) @ (alpha * sign(W))`` from packed signs, by XOR + popcount.

  Args:
    x_words: ``[batch, words]`` uint32 from :func:`pack_signs`.
    w_words: ``[n_out, words]`` uint32 from :func:`xnor_weights`.
    n_in: the true input width (padding bits are 0 in both, so they match
      and do not count as differences).
    alpha: scale ``()`` or ``(n_out,)``.
    bias: optional ``[n_out]``.

  Returns:
    ``[batch, n_out]`` float32.
  """
  diff = jax.lax.population_count(x_words[:, None, :] ^ w_words[None, :, :])
  dot = n_in - 2 * jnp.sum(diff.astype(jnp.int32), axis=-1)
  y = jnp.asarray(alpha, jnp.float32) * dot.astype(jnp.float32)
  return y if bias is None else y + bias


def reference_dense(x, w, bias=None):
  """The float matmul the packed layers replace (for tests and benchmarks)."""
  y = x @ w
  return y if bias is None else y + bias


def packed_bytes(shape, bits: int) -> int:
  """Resident bytes of a packed ``shape`` kernel (codes only)."""
  return packing.packed_size(int(np.prod(shape)), bits)
