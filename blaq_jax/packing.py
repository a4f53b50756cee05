"""Bit packing of quantization codes: ``k`` bits per weight, no wasted bits.

Codes (the uint8 indices into a level set, see :mod:`blaq_jax.levels`) are
laid out as one contiguous little-endian bit stream: the ``i``-th code of the
flattened (C order) tensor occupies stream bits ``i k .. i k + k - 1``, its
least significant bit first, and stream bit ``j`` is bit ``j mod 8`` of byte
``floor(j / 8)``. ``n`` codes therefore take

.. math::

  \\left\\lceil \\frac{n k}{8} \\right\\rceil \\text{ bytes},

8 weights per byte at 1 bit, and only the last byte can hold unused (zero)
bits. The same layout serves every ``k`` in 1..8 (3-bit codes straddle bytes).

:func:`pack_bits` / :func:`unpack_bits` are numpy (export and load);
:func:`pack_bits_jnp` / :func:`unpack_bits_jnp` compute the same bytes with
``jax.numpy`` under ``jit`` (``bits`` and ``count`` static), e.g. to unpack
a kernel on the fly inside a jitted forward pass.

Example:
  >>> import numpy as np
  >>> from blaq_jax.packing import pack_bits, unpack_bits
  >>> codes = np.array([1, 0, 1, 1, 0, 0, 0, 1, 1], np.uint8)
  >>> packed = pack_bits(codes, 1)
  >>> packed.tolist()  # 0b10001101 = 141; the 9th code starts a new byte
  [141, 1]
  >>> unpack_bits(packed, 1, 9).tolist()
  [1, 0, 1, 1, 0, 0, 0, 1, 1]
  >>> pack_bits(np.array([3, 1, 2], np.uint8), 2).tolist()  # 0b100111 = 39
  [39]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from blaq_jax.levels import MAX_BITS


def _check_bits(bits) -> int:
  if isinstance(bits, (bool, np.bool_)) or not isinstance(
      bits, (int, np.integer)) or not 1 <= int(bits) <= MAX_BITS:
    raise ValueError(
        f"bits must be an int in 1..{MAX_BITS}, got {bits!r}.")
  return int(bits)


def packed_size(count: int, bits: int) -> int:
  """Bytes taken by ``count`` codes of ``bits`` bits: ``ceil(count bits / 8)``."""
  return (int(count) * _check_bits(bits) + 7) // 8


def pack_bits(codes, bits: int) -> np.ndarray:
  """Packs codes into a 1-D ``uint8`` array of ``ceil(n bits / 8)`` bytes.

  Args:
    codes: unsigned integer array (any shape, flattened in C order) with
      every entry ``< 2**bits``.
    bits: bits per code, 1..8.

  Returns:
    The packed bytes (numpy ``uint8``, 1-D).

  Raises:
    ValueError: a code does not fit in ``bits`` bits, or codes are not
      unsigned integers.
  """
  bits = _check_bits(bits)
  c = np.asarray(codes)
  if c.dtype.kind not in "ub":
    raise ValueError(f"codes must be an unsigned integer array, got dtype "
                     f"{c.dtype}.")
  c = c.reshape(-1)
  if c.size and int(c.max()) >= 1 << bits:
    raise ValueError(f"codes do not fit in {bits} bits: the largest is "
                     f"{int(c.max())} >= {1 << bits}.")
  c = c.astype(np.uint8)
  if bits == 8:
    return c.copy()
  stream = np.unpackbits(c[:, None], axis=1, bitorder="little")[:, :bits]
  return np.packbits(stream.reshape(-1), bitorder="little")


def unpack_bits(packed, bits: int, count: int) -> np.ndarray:
  """The first ``count`` codes of a packed stream, as a 1-D ``uint8`` array.

  Args:
    packed: 1-D ``uint8`` bytes from :func:`pack_bits`.
    bits: bits per code, 1..8.
    count: number of codes (the tensor's size); reshape the result yourself.

  Raises:
    ValueError: ``packed`` does not have exactly ``ceil(count bits / 8)``
      bytes, or its unused final bits are not zero.
  """
  bits = _check_bits(bits)
  p = np.asarray(packed)
  if p.dtype != np.uint8 or p.ndim != 1:
    raise ValueError(f"packed must be a 1-D uint8 array, got {p.dtype} of "
                     f"shape {p.shape}.")
  need = packed_size(count, bits)
  if p.size != need:
    raise ValueError(f"{count} codes of {bits} bits take {need} bytes, got "
                     f"{p.size}.")
  if bits == 8:
    return p.copy()
  stream = np.unpackbits(p, bitorder="little")
  if stream[count * bits:].any():
    raise ValueError("The padding bits after the last code are not zero: "
                     "the packed data is corrupt or has another layout.")
  per_code = stream[:count * bits].reshape(count, bits)
  return np.packbits(per_code, axis=1, bitorder="little")[:, 0]


def pack_bits_jnp(codes, bits: int) -> jax.Array:
  """:func:`pack_bits` in ``jax.numpy`` (``bits`` static; no range check)."""
  bits = _check_bits(bits)
  c = jnp.ravel(codes).astype(jnp.uint8)
  if bits == 8:
    return c
  shifts = jnp.arange(bits, dtype=jnp.uint8)
  stream = ((c[:, None] >> shifts) & 1).reshape(-1)
  stream = jnp.pad(stream, (0, (-stream.size) % 8))
  weights = jnp.left_shift(jnp.uint8(1), jnp.arange(8, dtype=jnp.uint8))
  return jnp.sum(stream.reshape(-1, 8) * weights, axis=1, dtype=jnp.uint8)


def unpack_bits_jnp(packed, bits: int, count: int) -> jax.Array:
  """:func:`unpack_bits` in ``jax.numpy`` (``bits``/``count`` static).

  Usable under ``jit``; it trusts its input (no size or padding checks
  beyond shapes).
  """
  bits = _check_bits(bits)
  p = jnp.asarray(packed, jnp.uint8)
  if p.shape != (packed_size(count, bits),):
    raise ValueError(f"{count} codes of {bits} bits take "
                     f"{packed_size(count, bits)} bytes, got shape {p.shape}.")
  if bits == 8:
    return p
  stream = ((p[:, None] >> jnp.arange(8, dtype=jnp.uint8)) & 1).reshape(-1)
  per_code = stream[:count * bits].reshape(count, bits)
  weights = jnp.left_shift(jnp.uint8(1), jnp.arange(bits, dtype=jnp.uint8))
  return jnp.sum(per_code * weights, axis=1, dtype=jnp.uint8)
