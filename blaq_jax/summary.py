"""Per-layer size report: bits, parameter counts, packed vs float32 memory.

Training keeps every weight as a float; the saving of a ``k``-bit leaf of
``n`` weights shows only once it is packed (:func:`blaq_jax.export`):

.. math::

  \\text{packed} = \\left\\lceil \\frac{n k}{8} \\right\\rceil + 4 s,
  \\qquad \\text{float32} = 4 n,
  \\qquad \\text{ratio} = \\frac{\\text{float32}}{\\text{packed}},

with ``s`` the number of ``float32`` scales (1 per tensor, or one per
channel). Full-precision leaves count at their own dtype's size. At 1 bit
the ratio of a quantized layer approaches 32.

Example:
  >>> import jax.numpy as jnp, blaq_jax
  >>> params = {"fc": {"kernel": jnp.zeros((784, 256)),
  ...                  "bias": jnp.zeros(256)}}
  >>> s = blaq_jax.summary(params, bits=1, print_fn=None)
  >>> [(r.name, r.bits, r.packed_bytes) for r in s.rows]
  [('fc/bias', 0, 1024), ('fc/kernel', 1, 25092)]
  >>> round(s.quantized_ratio, 2)
  31.99
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blaq_jax import selection
from blaq_jax.levels import LevelSet
from blaq_jax.projection import scale_shape
from blaq_jax.state import QuantizedTensor
from blaq_jax.state import quantized_tensors


@dataclasses.dataclass(frozen=True)
class Row:
  """One leaf of the report.

  Attributes:
    name: :func:`~blaq_jax.selection.path_str` of the leaf.
    shape: its shape.
    dtype: its dtype name in the params.
    bits: bit width (0 = full precision).
    level_set: level set kind of a quantized leaf, else ``None``.
    params: number of weights ``n``.
    scales: number of ``float32`` scales stored with it (0 if full
      precision).
    float32_bytes: ``4 n``.
    packed_bytes: ``ceil(n bits / 8) + 4 scales`` if quantized, else
      ``n * itemsize`` of its dtype.
  """

  name: str
  shape: tuple
  dtype: str
  bits: int
  level_set: Optional[str]
  params: int
  scales: int
  float32_bytes: int
  packed_bytes: int

  @property
  def ratio(self) -> float:
    return self.float32_bytes / self.packed_bytes if self.packed_bytes else (
        float("nan"))


def _ratio(num, den) -> float:
  return num / den if den else float("nan")


@dataclasses.dataclass(frozen=True)
class Summary:
  """The table of :func:`summary`; ``str()`` / :attr:`text` print it."""

  rows: tuple

  @property
  def total_params(self) -> int:
    return sum(r.params for r in self.rows)

  @property
  def float32_bytes(self) -> int:
    return sum(r.float32_bytes for r in self.rows)

  @property
  def packed_bytes(self) -> int:
    return sum(r.packed_bytes for r in self.rows)

  @property
  def ratio(self) -> float:
    """Compression of the whole model, float32 bytes over packed bytes."""
    return _ratio(self.float32_bytes, self.packed_bytes)

  @property
  def quantized_params(self) -> int:
    return sum(r.params for r in self.rows if r.bits)

  @property
  def quantized_float32_bytes(self) -> int:
    return sum(r.float32_bytes for r in self.rows if r.bits)

  @property
  def quantized_packed_bytes(self) -> int:
    return sum(r.packed_bytes for r in self.rows if r.bits)

  @property
  def quantized_ratio(self) -> float:
    """Compression of the quantized leaves alone."""
    return _ratio(self.quantized_float32_bytes, self.quantized_packed_bytes)

  def as_dict(self) -> dict:
    """Rows and totals as plain Python data (e.g. for JSON logs)."""
    return dict(
        rows=[dataclasses.asdict(r) for r in self.rows],
        total_params=self.total_params, float32_bytes=self.float32_bytes,
        packed_bytes=self.packed_bytes, ratio=self.ratio,
        quantized_params=self.quantized_params,
        quantized_float32_bytes=self.quantized_float32_bytes,
        quantized_packed_bytes=self.quantized_packed_bytes,
        quantized_ratio=self.quantized_ratio)

  @property
  def text(self) -> str:
    head = ("layer", "shape", "dtype", "bits", "params", "float32 B",
            "packed B", "ratio")
    body = [(r.name, "x".join(map(str, r.shape)) or "()", r.dtype,
             f"{r.bits} {r.level_set}" if r.bits else "fp",
             f"{r.params:,}", f"{r.float32_bytes:,}", f"{r.packed_bytes:,}",
             f"{r.ratio:.2f}x") for r in self.rows]
    body.append(("total", "", "", "", f"{self.total_params:,}",
                 f"{self.float32_bytes:,}", f"{self.packed_bytes:,}",
                 f"{self.ratio:.2f}x"))
    body.append(("quantized layers", "", "", "", f"{self.quantized_params:,}",
                 f"{self.quantized_float32_bytes:,}",
                 f"{self.quantized_packed_bytes:,}",
                 f"{self.quantized_ratio:.2f}x"))
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]

    def fmt(cells):
      return "  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(cells, widths)))

    sep = "-" * len(fmt(head))
    lines = [fmt(head), sep] + [fmt(b) for b in body[:-2]] + [sep] + [
        fmt(b) for b in body[-2:]]
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.text


def summary(params, opt_state=None, *, quantize: selection.Quantize = None,
            bits: int = 1, level_set: str = "blaq",
            channel_axis: Optional[int] = None,
            print_fn: Optional[Callable[[str], None]] = print) -> Summary:
  """Per-layer bits, parameter counts and memory, packed vs float32.

  Args:
    params: the params tree (arrays or ``jax.ShapeDtypeStruct``; an
      ``nnx.State`` works too).
    opt_state: a blaq_jax optimizer state: bits, level sets and scale
      granularity are read from its :class:`~blaq_jax.state.QuantizedTensor`
      leaves (matched to params by path name). Without it they follow
      ``quantize``, ``bits``, ``level_set`` and ``channel_axis`` as the
      transforms resolve them (:mod:`blaq_jax.selection`).
    quantize, bits, level_set, channel_axis: the transform's arguments (used
      only without ``opt_state``).
    print_fn: called with the table's text; ``None`` prints nothing.

  Returns:
    A :class:`Summary` (rows and totals, ``.text`` for the table).
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = [selection.path_str(p) for p, _ in flat]
  if opt_state is not None:
    qtree = quantized_tensors(opt_state)
    qflat = jax.tree_util.tree_flatten_with_path(
        qtree, is_leaf=lambda x: isinstance(
            x, (QuantizedTensor, optax.MaskedNode)))[0]
    qts = {selection.path_str(p): t for p, t in qflat
           if isinstance(t, QuantizedTensor)}
    missing = sorted(set(qts) - set(names))
    if missing:
      raise ValueError(f"summary: quantized leaves of opt_state are missing "
                       f"from params: {missing}.")
    per_leaf = [(qts[n].level_set, qts[n].channel_axis) if n in qts
                else (None, None) for n in names]
  else:
    widths = selection.resolve_bits(params, quantize, bits, level_set)
    per_leaf = [(LevelSet(level_set, b), channel_axis) if b else (None, None)
                for b in widths]

  rows = []
  for name, (_, leaf), (ls, ch) in zip(names, flat, per_leaf):
    shape = tuple(int(s) for s in np.shape(leaf))
    dtype = np.dtype(jnp.result_type(leaf))
    n = int(np.prod(shape, dtype=np.int64))
    if ls is None:
      scales, packed = 0, n * dtype.itemsize
    else:
      scales = int(np.prod(scale_shape(shape, ch), dtype=np.int64))
      packed = (n * ls.bits + 7) // 8 + 4 * scales
    rows.append(Row(name=name, shape=shape, dtype=dtype.name,
                    bits=ls.bits if ls else 0,
                    level_set=ls.kind if ls else None, params=n,
                    scales=scales, float32_bytes=4 * n, packed_bytes=packed))
  result = Summary(rows=tuple(rows))
  if print_fn is not None:
    print_fn(result.text)
  return result
