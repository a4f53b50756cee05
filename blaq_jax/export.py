"""Packed low-bit export of trained params, and its bit-exact loader.

During training the params are float arrays that merely *take* values on the
level set; memory does not shrink. :func:`export` writes what a quantized
leaf really is, its codes packed at ``k`` bits per weight
(:mod:`blaq_jax.packing`) and its scale(s) ``alpha``, so that a leaf of ``n``
weights takes

.. math::

  \\left\\lceil \\frac{n k}{8} \\right\\rceil + 4 \\cdot \\#\\alpha
  \\text{ bytes instead of } 4 n,

and stores full-precision leaves (biases, batch norm) as they are.
:func:`load` rebuilds ``q = alpha * Q[codes]`` with
:meth:`blaq_jax.state.QuantizedTensor.dequantize`, the function the
optimizer uses, so the loaded weights equal
``blaq_jax.quantized_params(params, opt_state)`` bit for bit.

**Container.** One `safetensors <https://github.com/huggingface/safetensors>`_
file: an 8-byte header length, a JSON header, then the raw tensor bytes. It
was chosen over ``.npz`` because it is a single flat buffer with no pickle
and no zip layer, keeps ``bfloat16`` leaves natively (``BF16``), carries
string metadata in its header, and is read by the common ML tools; the
packed codes are plain ``U8`` tensors there. Tensors are named by
:func:`blaq_jax.selection.path_str` of their leaf (``"layers/0/kernel"``); a
quantized leaf ``name`` is the two tensors ``name:codes`` (1-D packed bytes)
and ``name:alpha`` (``float32``, shape ``()`` or ``(C,)``).

**Header.** ``__metadata__["blaq_jax"]`` is a JSON document with the format
name and version, ``blaq_jax.__version__``, user metadata, and per leaf its
shape, dtype, whether it is quantized and then its level set kind, bits and
``channel_axis``, plus the SHA-256 of every tensor's bytes;
``__metadata__["blaq_jax_sha256"]`` is the SHA-256 of that JSON text.
:func:`load` reads the whole file, checks the format version, both checksums,
every shape, dtype, packed size and code range before it returns anything,
and raises :class:`ExportError` (a ``ValueError``) naming the problem.

Example:
  >>> import os, tempfile, jax, jax.numpy as jnp, optax, blaq_jax
  >>> params = {"dense": {"kernel": jnp.array([[0.3, -0.1, 0.2],
  ...                                          [0.2, -0.4, 0.1]]),
  ...                     "bias": jnp.zeros(3)}}
  >>> opt = blaq_jax.laq(1e-2, bits=2)
  >>> state = opt.init(params)
  >>> grads = jax.tree.map(jnp.ones_like, params)
  >>> updates, state = opt.update(grads, state, params)
  >>> params = optax.apply_updates(params, updates)
  >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
  >>> _ = blaq_jax.export(path, params, state)
  >>> flat = blaq_jax.load(path)  # no template: {path_str: array}
  >>> sorted(flat)
  ['dense/bias', 'dense/kernel']
  >>> q = blaq_jax.quantized_params(params, state)
  >>> bool(jnp.array_equal(flat["dense/kernel"], q["dense"]["kernel"]))
  True
  >>> restored = blaq_jax.load(path, params)  # the structure of params
  >>> jax.tree.structure(restored) == jax.tree.structure(params)
  True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import struct
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from blaq_jax import packing
from blaq_jax.levels import LevelSet
from blaq_jax.projection import scale_shape
from blaq_jax.selection import path_str
from blaq_jax.state import QuantizedTensor
from blaq_jax.state import quantized_tensors

FORMAT = "blaq_jax.export"
FORMAT_VERSION = 1
_META_KEY = "blaq_jax"
_META_SHA_KEY = "blaq_jax_sha256"
_ROOT = "<root>"  # the name of a params tree that is a single array

# safetensors dtype codes <-> numpy dtypes (bfloat16 from ml_dtypes).
_DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8), "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
_CODES = {v: k for k, v in _DTYPES.items()}

PathLike = Union[str, os.PathLike]


class ExportError(ValueError):
  """A file that cannot be exported to or loaded from (named in the text)."""


@dataclasses.dataclass(frozen=True)
class PackedLeaf:
  """One quantized leaf as stored: packed codes and scale(s).

  Attributes:
    packed: 1-D ``uint8`` codes packed at ``level_set.bits`` bits each.
    alpha: ``float32`` scale(s), shape ``()`` or ``(C,)``.
    level_set: the :class:`~blaq_jax.levels.LevelSet` of the codes.
    shape: the weight's shape.
    dtype: the weight's dtype (what :meth:`dequantize` returns).
    channel_axis: ``None`` (one scale) or the axis with its own scale.
  """

  packed: np.ndarray
  alpha: np.ndarray
  level_set: LevelSet
  shape: tuple
  dtype: np.dtype
  channel_axis: Optional[int]

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  def codes(self) -> np.ndarray:
    """The unpacked ``uint8`` codes, of :attr:`shape`."""
    return packing.unpack_bits(self.packed, self.level_set.bits,
                               self.size).reshape(self.shape)

  def quantized_tensor(self) -> QuantizedTensor:
    return QuantizedTensor(jnp.asarray(self.codes()), jnp.asarray(self.alpha),
                           self.level_set, self.channel_axis)

  def dequantize(self) -> jax.Array:
    """``alpha * Q[codes]``, computed as the optimizer computes it."""
    return self.quantized_tensor().dequantize(self.dtype)


@dataclasses.dataclass(frozen=True)
class ExportContents:
  """A validated export file in memory (see :func:`read_export`).

  Attributes:
    header: the decoded ``blaq_jax`` JSON header.
    leaves: ``{name: PackedLeaf | np.ndarray}`` in file order.
  """

  header: dict
  leaves: dict

  @property
  def metadata(self) -> dict:
    """The user metadata given to :func:`export`."""
    return self.header.get("metadata", {})


def _sha256(b) -> str:
  return hashlib.sha256(memoryview(b)).hexdigest()


def _leaf_name(path) -> str:
  return path_str(path) or _ROOT


def _named_leaves(tree, what: str, is_leaf=None):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  out = {}
  for path, leaf in flat:
    name = _leaf_name(path)
    if name in out:
      raise ExportError(f"{what}: two leaves are both named '{name}' by "
                        "path_str; rename one so that the file can key them.")
    out[name] = leaf
  return out


def _as_numpy(leaf, name: str) -> np.ndarray:
  arr = np.array(leaf, order="C")  # (ascontiguousarray makes 0-d 1-d)
  if arr.dtype not in _CODES:
    raise ExportError(f"Leaf '{name}' has dtype {arr.dtype}, which the "
                      f"export format does not store (supported: "
                      f"{sorted(d.name for d in _CODES)}).")
  return arr


def _check_matches_state(name, p, q):
  """``p`` (params) must equal ``q`` (dequantized state) up to an ulp or so.

  ``optax.apply_updates`` computes ``p + (q - p)``, which can round an ulp
  away from ``q`` where a level changed; a larger gap means params and
  opt_state are from different steps.
  """
  p32 = np.asarray(p, np.float32)
  q32 = np.asarray(q, np.float32)
  if p32.size == 0:
    return
  scale = max(float(np.max(np.abs(p32))), float(np.max(np.abs(q32))))
  gap = float(np.max(np.abs(p32 - q32)))
  tol = 4 * float(jnp.finfo(q.dtype).eps) * scale
  if not gap <= tol:
    raise ExportError(
        f"params leaf '{name}' is not the quantized weight held in opt_state "
        f"(max |params - alpha*Q[codes]| = {gap:.3g} > {tol:.3g}); are params "
        "and opt_state from the same step? Pass the params the optimizer "
        "produced (optax.apply_updates(params, updates)).")


def export(path: PathLike, params, opt_state, *,
           metadata: Optional[dict] = None) -> pathlib.Path:
  """Writes params with packed quantized leaves to one safetensors file.

  Quantized leaves are found in ``opt_state`` (the
  :class:`~blaq_jax.state.QuantizedTensor` tree of a blaq_jax transform) and
  matched to the leaves of ``params`` by :func:`~blaq_jax.selection.path_str`,
  so ``params`` may also be a larger tree than the optimizer's (e.g. all of
  an ``nnx.state(model)``, batch statistics included); its other leaves are
  stored as they are. The stored weight of a quantized leaf is
  ``alpha * Q[codes]`` (what the model computes with); the params must
  equal it up to the ulp rounding of ``optax.apply_updates``.

  Args:
    path: file to write (conventionally ``*.safetensors``); parent
      directories are created. Written to a temporary file and renamed, so a
      crash never leaves a half-written export under ``path``.
    params: the params tree (arrays, ``nnx.State``, ...). To export a Flax
      NNX model whole, pass ``nnx.state(model)`` rather than
      ``nnx.state(model, nnx.Param)``: its leaves that the optimizer does
      not quantize (biases, batch norm scale and running statistics) are
      stored as float tensors, and ``load(path, nnx.state(fresh_model))``
      restores all of them.
    opt_state: the optimizer state holding the quantized tensors, or
      ``None`` to store every leaf in full precision.
    metadata: JSON-serializable user metadata (config, accuracy, ...),
      returned by ``read_export(path).metadata``.

  Returns:
    The path written, as a ``pathlib.Path``.

  Raises:
    ExportError: a quantized leaf of ``opt_state`` is missing from or has
      another shape than ``params``, params and state disagree, two leaves
      share a name, a dtype cannot be stored, or metadata is not JSON.
  """
  from blaq_jax import __version__  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  leaves = _named_leaves(params, "params")
  qts = {}
  if opt_state is not None:
    qtree = quantized_tensors(opt_state)
    qts = {k: v for k, v in _named_leaves(
        qtree, "opt_state", is_leaf=lambda x: isinstance(
            x, (QuantizedTensor, optax.MaskedNode))).items()
           if isinstance(v, QuantizedTensor)}
  missing = sorted(set(qts) - set(leaves))
  if missing:
    raise ExportError(f"Quantized leaves of opt_state are missing from "
                      f"params: {missing}.")
  try:
    user = json.loads(json.dumps(metadata if metadata is not None else {}))
  except (TypeError, ValueError) as e:
    raise ExportError(f"metadata must be JSON-serializable: {e}") from e

  tensors, specs = {}, {}
  for name, leaf in leaves.items():
    shape = tuple(int(s) for s in np.shape(leaf))
    dtype = jnp.result_type(leaf)
    qt = qts.get(name)
    if qt is None:
      arr = _as_numpy(leaf, name)
      tensors[name] = arr
      specs[name] = dict(quantized=False, shape=list(shape),
                         dtype=arr.dtype.name,
                         sha256=_sha256(arr.tobytes()))
      continue
    if tuple(np.shape(qt.codes)) != shape:
      raise ExportError(f"Leaf '{name}': params shape {shape} but the codes "
                        f"in opt_state have shape {np.shape(qt.codes)}.")
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ExportError(f"Quantized leaf '{name}' has non-float dtype {dtype}.")
    q = qt.dequantize(dtype)
    _check_matches_state(name, leaf, q)
    codes = np.asarray(qt.codes)
    if codes.size and int(codes.max()) >= qt.level_set.num_levels:
      raise ExportError(f"Leaf '{name}': a code exceeds the level set "
                        f"{qt.level_set}.")
    packed = packing.pack_bits(codes, qt.bits)
    alpha = np.array(qt.alpha, np.float32, order="C")
    if alpha.shape != scale_shape(shape, qt.channel_axis):
      raise ExportError(f"Leaf '{name}': alpha has shape {alpha.shape}, "
                        f"expected {scale_shape(shape, qt.channel_axis)}.")
    tensors[name + ":codes"] = packed
    tensors[name + ":alpha"] = alpha
    specs[name] = dict(
        quantized=True, shape=list(shape), dtype=np.dtype(dtype).name,
        level_set=qt.level_set.kind, bits=qt.bits,
        channel_axis=qt.channel_axis,
        codes_sha256=_sha256(packed.tobytes()),
        alpha_sha256=_sha256(alpha.tobytes()))
  if len(tensors) != len(leaves) + len(qts):
    raise ExportError("A full-precision leaf name ends in ':codes' or "
                      "':alpha' and collides with a quantized leaf; rename "
                      "it.")

  header = dict(format=FORMAT, format_version=FORMAT_VERSION,
                library="blaq_jax", library_version=__version__,
                metadata=user, leaves=specs)
  text = json.dumps(header, sort_keys=True)
  import safetensors  # pylint: disable=g-import-not-at-top
  blob = safetensors.serialize(
      {k: safetensors.TensorSpec(dtype=v.dtype.name, shape=list(v.shape),
                                 data_ptr=v.ctypes.data, data_len=v.nbytes)
       for k, v in tensors.items()},
      metadata={_META_KEY: text, _META_SHA_KEY: _sha256(text.encode())})
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(blob)
  os.replace(tmp, path)
  return path


def _parse_header(data: bytes, where: str) -> dict:
  if len(data) < 8:
    raise ExportError(f"{where}: truncated or not a safetensors file "
                      f"({len(data)} bytes).")
  (n,) = struct.unpack("<Q", data[:8])
  if 8 + n > len(data):
    raise ExportError(f"{where}: truncated file: the header claims {n} "
                      f"bytes but only {len(data) - 8} follow.")
  try:
    head = json.loads(data[8:8 + n].decode("utf-8"))
    meta = head["__metadata__"]
    text = meta[_META_KEY]
  except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
    raise ExportError(f"{where}: not a blaq_jax export (unreadable or "
                      f"missing header: {e!r}).") from e
  try:
    header = json.loads(text)
  except ValueError as e:
    raise ExportError(f"{where}: corrupt blaq_jax header: {e}.") from e
  if not isinstance(header, dict) or header.get("format") != FORMAT:
    raise ExportError(f"{where}: not a blaq_jax export (format "
                      f"{header.get('format') if isinstance(header, dict) else header!r}).")
  version = header.get("format_version")
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise ExportError(
        f"{where}: format version {version!r} was written by a newer "
        f"blaq_jax ({header.get('library_version')}); this one "
        f"({_lib_version()}) reads versions up to {FORMAT_VERSION}. "
        "Upgrade blaq_jax.")
  if _sha256(text.encode()) != meta.get(_META_SHA_KEY):
    raise ExportError(f"{where}: the blaq_jax header fails its checksum "
                      "(corrupt file).")
  return header


def _lib_version() -> str:
  from blaq_jax import __version__  # pylint: disable=g-import-not-at-top
  return __version__


def read_export(path: PathLike) -> ExportContents:
  """Reads and fully validates an export file, without dequantizing.

  Returns:
    :class:`ExportContents`: the header and, per leaf, a :class:`PackedLeaf`
    (quantized) or a numpy array (full precision). Useful to inspect a file
    or to run a packed layer (:mod:`blaq_jax.packed_dense`) from it.

  Raises:
    ExportError: unreadable, truncated or corrupt file (checksums), or a
      format version newer than this library's.
  """
  path = pathlib.Path(path)
  where = f"blaq_jax export '{path}'"
  with open(path, "rb") as f:
    data = f.read()
  header = _parse_header(data, where)
  import safetensors  # pylint: disable=g-import-not-at-top
  try:
    raw = {name: t for name, t in safetensors.deserialize(data)}
  except Exception as e:  # SafetensorError and friends
    raise ExportError(f"{where}: corrupt or truncated tensor data: "
                      f"{e}") from e

  def tensor(name, checksum):
    if name not in raw:
      raise ExportError(f"{where}: tensor '{name}' is missing.")
    t = raw[name]
    if t["dtype"] not in _DTYPES:
      raise ExportError(f"{where}: tensor '{name}' has unsupported dtype "
                        f"{t['dtype']}.")
    if _sha256(t["data"]) != checksum:
      raise ExportError(f"{where}: tensor '{name}' fails its SHA-256 "
                        "checksum (corrupt file).")
    return np.frombuffer(bytes(t["data"]), _DTYPES[t["dtype"]]).reshape(
        t["shape"])

  leaves, used = {}, set()
  try:
    specs = dict(header["leaves"])
    for name, spec in specs.items():
      shape = tuple(int(s) for s in spec["shape"])
      dtype = np.dtype(ml_dtypes.bfloat16) if spec["dtype"] == "bfloat16" \
          else np.dtype(spec["dtype"])
      if not spec["quantized"]:
        arr = tensor(name, spec["sha256"])
        used.add(name)
        if arr.shape != shape or arr.dtype != dtype:
          raise ExportError(f"{where}: leaf '{name}' is stored as "
                            f"{arr.dtype}{list(arr.shape)}, the header says "
                            f"{dtype}{list(shape)}.")
        leaves[name] = arr
        continue
      ls = LevelSet(spec["level_set"], spec["bits"])
      ch = spec["channel_axis"]
      packed = tensor(name + ":codes", spec["codes_sha256"])
      alpha = tensor(name + ":alpha", spec["alpha_sha256"])
      used.update((name + ":codes", name + ":alpha"))
      leaf = PackedLeaf(packed, alpha, ls, shape, dtype, ch)
      if packed.dtype != np.uint8 or packed.shape != (
          packing.packed_size(leaf.size, ls.bits),):
        raise ExportError(f"{where}: leaf '{name}': packed codes have "
                          f"{packed.dtype}{list(packed.shape)}, expected "
                          f"{packing.packed_size(leaf.size, ls.bits)} bytes.")
      if alpha.dtype != np.float32 or alpha.shape != scale_shape(shape, ch):
        raise ExportError(f"{where}: leaf '{name}': alpha has "
                          f"{alpha.dtype}{list(alpha.shape)}.")
      try:
        codes = leaf.codes()  # checks the zero padding
      except ValueError as e:
        raise ExportError(f"{where}: leaf '{name}': {e}") from e
      if codes.size and int(codes.max()) >= ls.num_levels:
        raise ExportError(f"{where}: leaf '{name}': code {int(codes.max())} "
                          f"is outside the {ls.num_levels} levels of {ls}.")
      leaves[name] = leaf
  except ExportError:
    raise
  except (KeyError, TypeError, ValueError) as e:
    raise ExportError(f"{where}: malformed header: {e!r}.") from e
  extra = sorted(set(raw) - used)
  if extra:
    raise ExportError(f"{where}: tensors not described by the header: "
                      f"{extra}.")
  return ExportContents(header=header, leaves=leaves)


def _materialize(leaf) -> jax.Array:
  if isinstance(leaf, PackedLeaf):
    return leaf.dequantize()
  return jnp.asarray(leaf)


def load(path: PathLike, params_like=None, *, strict: bool = True):
  """Loads an :func:`export` file: the exact quantized params.

  Quantized leaves come back as ``alpha * Q[codes]`` in their saved dtype,
  computed by :meth:`~blaq_jax.state.QuantizedTensor.dequantize` (so they
  equal ``blaq_jax.quantized_params(params, opt_state)`` of the exported
  step bit for bit); full-precision leaves as saved. The file is read and
  validated completely before anything is returned.

  Args:
    path: the file written by :func:`export`.
    params_like: optional template tree (concrete arrays or
      ``jax.ShapeDtypeStruct``; e.g. ``nnx.state(model)``, or
      ``jax.eval_shape`` of an init). The result then has exactly its tree
      structure, and each leaf must exist in the file with the same shape
      and dtype. Without it the result is a flat dict
      ``{path_str(leaf path): jax.Array}`` in file order.
    strict: with ``params_like``, also reject file leaves that the template
      lacks (``False`` ignores them, e.g. to load only ``nnx.Param`` from a
      file that also holds batch statistics).

  Returns:
    The params (a tree like ``params_like``, or the flat dict).

  Raises:
    ExportError: corrupt, truncated or newer-format file, or a template that
      does not match (the message names the leaf).
  """
  contents = read_export(path)
  where = f"blaq_jax export '{path}'"
  if params_like is None:
    return {k: _materialize(v) for k, v in contents.leaves.items()}
  flat, treedef = jax.tree_util.tree_flatten_with_path(params_like)
  names = [_leaf_name(p) for p, _ in flat]
  if len(set(names)) != len(names):
    raise ExportError("params_like has two leaves with the same path_str "
                      "name.")
  missing = [n for n in names if n not in contents.leaves]
  extra = sorted(set(contents.leaves) - set(names))
  if missing or (strict and extra):
    raise ExportError(
        f"{where} does not match params_like: leaves missing from the file: "
        f"{missing}; leaves in the file but not in params_like: {extra}"
        + (" (pass strict=False to ignore those)." if extra else "."))
  out = []
  for name, (_, like) in zip(names, flat):
    stored = contents.leaves[name]
    shape = tuple(stored.shape)
    dtype = np.dtype(stored.dtype)
    like_shape = tuple(np.shape(like))
    like_dtype = np.dtype(jnp.result_type(like))
    if like_shape != shape or like_dtype != dtype:
      raise ExportError(
          f"{where}: leaf '{name}' is {dtype.name}{list(shape)} in the file "
          f"but {like_dtype.name}{list(like_shape)} in params_like.")
    out.append(_materialize(stored))
  return treedef.unflatten(out)
