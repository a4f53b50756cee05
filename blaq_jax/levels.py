"""Level sets ``Q`` of k-bit weight quantizers and their nearest-level maps.

A quantized tensor is ``q = alpha * beta`` with ``beta`` in a finite, sorted level
set ``Q`` and a positive scale ``alpha``. The *code* of an entry is the index of
its level in the sorted ``Q`` (an unsigned integer), which is what export packs.

Three families (``n`` as below, ``k`` the bit width):

.. math::

  \\text{blaq}:\\;   Q = \\{\\pm j / 2^{k-1} : j = 1..2^{k-1}\\}
      \\quad (2^k \\text{ levels, no zero; } k=1 \\text{ is } \\{-1, +1\\})

  \\text{linear}: Q = \\{ j / n : j = -n..n \\},\\; n = 2^{k-1} - 1
      \\quad (2^k - 1 \\text{ levels; } k=2 \\text{ is ternary})

  \\text{log}:\\;   Q = \\{0\\} \\cup \\{\\pm 2^{-j} : j = 0..n-1\\},\\; n = 2^{k-1} - 1

``nearest`` is closed form (a rounding, never an argmin over levels), so the
projection costs one fused elementwise pass whatever ``k`` is.

Example:
  >>> import jax.numpy as jnp
  >>> from blaq_jax.levels import LevelSet
  >>> ls = LevelSet("blaq", 2)
  >>> ls.values.tolist()
  [-1.0, -0.5, 0.5, 1.0]
  >>> ls.nearest(jnp.array([-0.9, -0.1, 0.0, 0.8])).tolist()
  [-1.0, -0.5, 0.5, 1.0]
  >>> ls.codes(jnp.array([-0.9, -0.1, 0.0, 0.8])).tolist()
  [0, 1, 2, 3]
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("blaq", "linear", "log")
MAX_BITS = 8


def check_bits(bits, kind: str = "blaq", where: str = "bits") -> int:
  """Validates a static bit width for a level-set kind and returns it as int."""
  if isinstance(bits, jax.Array):
    raise TypeError(
        f"{where} must be a static Python int, got a JAX array (a traced or "
        "injected value). Under "
        "optax.inject_hyperparams pass it in static_args, e.g. "
        "inject_hyperparams(blaq_jax.blaq, static_args=('bits', 'active'))."
    )
  if isinstance(bits, (bool, np.bool_)) or not isinstance(
      bits, (int, np.integer)):
    raise TypeError(f"{where} must be an int, got {bits!r}.")
  bits = int(bits)
  low = 1 if kind == "blaq" else 2
  if not low <= bits <= MAX_BITS:
    raise ValueError(
        f"Unsupported bit width {where}={bits} for level set {kind!r}: "
        f"supported widths are {low}..{MAX_BITS}.")
  return bits


@dataclasses.dataclass(frozen=True)
class LevelSet:
  """A sorted level set ``Q`` in ``[-1, 1]`` with closed-form nearest level.

  Attributes:
    kind: ``"blaq"`` (no zero, the BLAQ paper's set), ``"linear"`` (uniform
      with zero, LAQ) or ``"log"`` (powers of two with zero, LAQ).
    bits: bit width ``k``; codes fit in ``k`` bits.
  """

  kind: str = "blaq"
  bits: int = 1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(
          f"Unknown level set {self.kind!r}; expected one of {KINDS}.")
    object.__setattr__(self, "bits", check_bits(self.bits, self.kind))

  @property
  def n(self) -> int:
    """The integer ``n`` of the module docstring for this kind and width."""
    if self.kind == "blaq":
      return 2 ** (self.bits - 1)
    return 2 ** (self.bits - 1) - 1

  @property
  def values(self) -> np.ndarray:
    """The sorted levels as a float32 numpy array."""
    n = self.n
    if self.kind == "blaq":
      j = np.concatenate([np.arange(-n, 0), np.arange(1, n + 1)])
      return (j / n).astype(np.float32)
    if self.kind == "linear":
      return (np.arange(-n, n + 1) / n).astype(np.float32)
    pos = 2.0 ** -np.arange(n - 1, -1, -1)
    return np.concatenate([-pos[::-1], [0.0], pos]).astype(np.float32)

  @property
  def num_levels(self) -> int:
    return len(self.values)

  def _index(self, x):
    """Signed integer level index ``j`` nearest to ``x`` (see module doc)."""
    n = self.n
    if self.kind == "blaq":
      sign = jnp.where(x < 0, -1.0, 1.0)  # sign(0) = +1
      if n == 1:
        return sign
      return sign * jnp.clip(jnp.round(jnp.abs(x) * n), 1, n)
    if self.kind == "linear":
      return jnp.clip(jnp.round(x * n), -n, n)
    # log: j = 0 means zero, j = +-(i + 1) means +-2^(i + 1 - n).
    ax = jnp.abs(x)
    smallest = 2.0 ** (1 - n)
    e = jnp.floor(jnp.log2(jnp.clip(ax, smallest, 1.0)))
    e = jnp.where(ax > 1.5 * 2.0 ** e, e + 1, e)  # nearer to the upper power
    e = jnp.clip(e, 1 - n, 0)
    mag = jnp.where(ax < 0.5 * smallest, 0.0, e + n)
    return jnp.where(x < 0, -mag, mag)

  def _value(self, j):
    n = self.n
    if self.kind == "log":
      return jnp.where(j == 0, 0.0, jnp.sign(j) * 2.0 ** (jnp.abs(j) - n))
    if self.kind == "linear" and n & (n - 1):
      # n = 3, 7, 15...: XLA may compute j / n as j * (1 / n), an ulp away
      # from the level; a table lookup gives exactly ``values``.
      return jnp.asarray(self.values)[(j + n).astype(jnp.int32)]
    return j / n  # n is a power of two: exact

  def nearest(self, x):
    """The level of ``Q`` nearest to each entry of ``x`` (same dtype as x)."""
    x = jnp.asarray(x)
    return self._value(self._index(x)).astype(x.dtype)

  def magnitude(self, ax):
    """``|nearest(x)|`` from ``ax = |x|``: the same values as ``nearest``.

    With one threshold per sign (1 and 2 bits: the 2-bit ``"blaq"`` set
    ``{+-1/2, +-1}``, ternary ``"linear"`` and ``"log"``) one comparison
    replaces the rounding: the projection's rounds reduce ``d |beta| |w|``
    and ``d |beta|^2`` with it, and XLA:CPU runs a comparison inside a
    reduction faster than a rounding and clamp (the ties go as in
    ``nearest``: ``round`` halves to even).

    Example:
      >>> import jax.numpy as jnp
      >>> LevelSet("blaq", 2).magnitude(jnp.array([0.0, 0.74, 0.75, 3.0]))
      Array([0.5, 0.5, 1. , 1. ], dtype=float32)
    """
    ax = jnp.asarray(ax)
    if self.kind == "blaq" and self.n == 1:
      return jnp.ones_like(ax)
    threshold = {("blaq", 2): 0.75, ("linear", 1): 0.5,
                 ("log", 1): 0.5}.get((self.kind, self.n))
    if threshold is None:
      return self.nearest(ax)
    low = 0.5 if self.kind == "blaq" else 0.0
    # linear: round(0.5) = 0 (half to even); log: 0.5 is the first power.
    above = ax > threshold if self.kind == "linear" else ax >= threshold
    return jnp.where(above, 1.0, low).astype(ax.dtype)

  def codes(self, x):
    """Codes (uint8 indices into :attr:`values`) of the levels nearest to x."""
    j = self._index(jnp.asarray(x, jnp.float32))
    if self.kind == "blaq":
      j = jnp.where(j < 0, j + self.n, j + self.n - 1)
    else:
      j = j + self.n
    return j.astype(jnp.uint8)

  def decode(self, codes, dtype=jnp.float32):
    """Levels ``beta`` for codes (the inverse of :meth:`codes`)."""
    c = jnp.asarray(codes).astype(jnp.int32)
    if self.kind == "blaq":
      j = jnp.where(c < self.n, c - self.n, c - self.n + 1)
    else:
      j = c - self.n
    return self._value(j.astype(jnp.float32)).astype(dtype)


@functools.lru_cache(maxsize=None)
def gaussian_scale(level_set: LevelSet) -> float:
  """The scale ``c`` that quantizes a standard normal best with ``c Q``.

  .. math::

    c = \\arg\\min_{c > 0}\\ \\mathbb{E}_{x \\sim N(0, 1)}
        \\bigl(x - c \\operatorname{nearest}_Q(x / c)\\bigr)^2 ,

  computed in closed form per cell (``int (x - m)^2 phi = (1 + m^2) Phi +
  (2m - x) phi``) on a grid of ``c`` refined by golden-section search. A
  tensor of D-weighted RMS ``r`` then gets the starting scale ``c r``
  (:func:`blaq_jax.projection.project` without a previous scale); for
  1 bit it is ``E|x| = sqrt(2 / pi)``.

  Example:
    >>> round(gaussian_scale(LevelSet("blaq", 1)), 4)
    0.7979
    >>> round(gaussian_scale(LevelSet("blaq", 2)), 3)
    1.302
  """
  v = level_set.values.astype(np.float64)
  mid = (v[1:] + v[:-1]) / 2
  erf = np.vectorize(math.erf)

  def distortion(c):
    lo = np.concatenate([[-np.inf], c * mid])
    hi = np.concatenate([c * mid, [np.inf]])
    m = c * v

    def antiderivative(x):
      cdf = 0.5 * (1 + erf(x / math.sqrt(2)))
      pdf = np.where(np.isfinite(x), np.exp(-0.5 * np.where(
          np.isfinite(x), x, 0.0) ** 2) / math.sqrt(2 * math.pi), 0.0)
      return (1 + m * m) * cdf + (2 * m - np.where(np.isfinite(x), x, 0.0)
                                  ) * pdf
    return float(np.sum(antiderivative(hi) - antiderivative(lo)))

  grid = np.linspace(0.05, 8.0, 400)
  k = int(np.argmin([distortion(c) for c in grid]))
  a, b = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
  ratio = (math.sqrt(5) - 1) / 2
  for _ in range(60):
    x1, x2 = b - ratio * (b - a), a + ratio * (b - a)
    if distortion(x1) < distortion(x2):
      b = x2
    else:
      a = x1
  return float((a + b) / 2)
