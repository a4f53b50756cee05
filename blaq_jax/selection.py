"""Which parameter leaves are quantized, and at how many bits.

Every transform of blaq_jax takes a ``quantize`` argument that resolves, per
leaf of the params tree, to a bit width (``0`` = trained in full precision):

* ``None`` (default): :func:`default_quantize`: kernels of dense and conv
  layers (a leaf named ``kernel`` with ``ndim >= 2``) at the transform's
  ``bits``; biases, norms and scalars stay full precision.
* a callable ``(path, leaf) -> bool | int``: ``True`` means ``bits``, an int
  is a bit width for that leaf, ``False``/``0``/``None`` full precision.
  ``path`` is a JAX key path (see :func:`path_str`).
* a tree with the params' structure whose leaves are ``bool``/``int``/``None``.

Example (first and last layers at 8 bits, as the paper does on ImageNet):
  >>> import jax.numpy as jnp
  >>> from blaq_jax.selection import default_quantize, path_str, resolve_bits
  >>> params = {"conv1": {"kernel": jnp.ones((3, 3, 3, 8))},
  ...           "fc": {"kernel": jnp.ones((8, 10)), "bias": jnp.ones(10)}}
  >>> def rule(path, leaf):
  ...   return 8 if "conv1" in path_str(path) else default_quantize(path, leaf)
  >>> resolve_bits(params, rule, bits=1, kind="blaq")
  [8, 0, 1]
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from blaq_jax.levels import check_bits

Quantize = Union[None, Callable[[Any, Any], Any], Any]


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _strip_variable(path):
  # Flax NNX Variables flatten to their ``.value``: a Variable-wrapped state
  # (what nnx.Optimizer gives ``init``) and its pure arrays (what it gives
  # ``update``) must name their leaves alike.
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      path[-1].name == "value"):
    return path[:-1]
  return path


def _is_variable(x) -> bool:
  # A Flax NNX Variable (duck-typed: the core does not import flax).
  return hasattr(x, "get_value") and hasattr(x, "get_metadata")


def pure_structure(params):
  """The treedef of ``params`` with NNX ``Variable`` wrappers removed.

  ``nnx.Optimizer`` gives ``init`` a state of Variables but ``update`` pure
  arrays. Per-leaf state whose leaves are not arrays (a
  :class:`~blaq_jax.state.QuantizedTensor`) must not be put inside a
  Variable: NNX would turn it into a plain dict when it writes the state
  back after an update.
  """
  return jax.tree.structure(jax.tree.map(
      lambda x: x.get_value() if _is_variable(x) else x, params,
      is_leaf=_is_variable))


def path_str(path) -> str:
  """``'layers/0/kernel'`` for a JAX key path."""
  return "/".join(_key_name(k) for k in _strip_variable(path))


def default_quantize(path, leaf) -> bool:
  """True for dense/conv kernels: leaf named ``kernel`` with ``ndim >= 2``."""
  path = _strip_variable(path)
  return bool(path) and _key_name(path[-1]) == "kernel" and jnp.ndim(leaf) >= 2


def check_float_leaves(params, who: str):
  """Raises TypeError naming the first leaf that is not a real float array."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{who}: parameter leaf '{path_str(path)}' has dtype {dtype}; only "
          "real floating-point leaves can be optimized (integer, bool and "
          "complex leaves are not supported: keep them out of the params "
          "tree given to the optimizer).")


def _to_bits(value, bits: int, kind: str, where: str) -> int:
  if value is None or value is False or (
      isinstance(value, (int, np.integer)) and not isinstance(value, bool)
      and int(value) == 0):
    return 0
  if value is True or isinstance(value, np.bool_) and bool(value):
    return bits
  return check_bits(value, kind, where=f"bits of leaf '{where}'")


def resolve_bits(params, quantize: Quantize, bits: int, kind: str):
  """Per-leaf bit widths (flattened in ``jax.tree.leaves`` order)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  if quantize is None or callable(quantize):
    rule = default_quantize if quantize is None else quantize
    return [_to_bits(rule(p, x), bits, kind, path_str(p)) for p, x in flat]
  mask_leaves, mask_def = jax.tree_util.tree_flatten(
      quantize, is_leaf=lambda x: x is None)
  if mask_def.num_leaves != treedef.num_leaves or (
      jax.tree.structure(jax.tree.map(lambda _: 0, quantize,
                                      is_leaf=lambda x: x is None))
      != treedef):
    have = {path_str(p) for p, _ in flat}
    got = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        quantize, is_leaf=lambda x: x is None)[0]}
    raise ValueError(
        "The quantize mask does not match the params tree: leaves only in "
        f"params: {sorted(have - got)}, only in the mask: {sorted(got - have)}"
        f" (params: {treedef}, mask: {mask_def}).")
  return [_to_bits(m, bits, kind, path_str(p))
          for (p, _), m in zip(flat, mask_leaves)]


def check_same_structure(reference, tree, what: str):
  """Raises ValueError listing leaf paths where ``tree`` differs."""
  ref_def = jax.tree.structure(reference)
  got_def = jax.tree.structure(tree)
  if ref_def == got_def:
    return
  have = {path_str(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(reference)[0]}
  got = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
  raise ValueError(
      f"{what} has a different tree structure from the params: leaves "
      f"missing from it: {sorted(have - got)}; unexpected leaves: "
      f"{sorted(got - have)}.")
