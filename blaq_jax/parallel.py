"""Averaging across data-parallel devices, shared by every transform.

Under ``pmap`` or ``shard_map`` each device holds a shard of the batch; a
transform that evaluates the loss or its gradient again (BLAQ's trial
gradient, FOGZO's finite differences) must average those evaluations over
the data-parallel axis exactly like the main gradient. Under ``jax.jit``
with a sharded batch (``jax.sharding``), XLA does this by itself and no
axis name is given.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from blaq_jax.parallel import pmean
  >>> f = jax.pmap(lambda x: pmean(x, "batch", who="demo"), axis_name="batch")
  >>> f(jnp.arange(jax.local_device_count(), dtype=jnp.float32)).shape
  (8,)
  >>> pmean(jnp.ones(2), None, who="demo").tolist()  # no axis: unchanged
  [1.0, 1.0]
"""

from __future__ import annotations

from typing import Any, Optional

import jax


def check_axis_bound(axis_name: Optional[str], who: str) -> None:
  """Raises a ValueError naming ``batch_axis_name`` if it is not bound here.

  Call it while tracing ``update``: the axis must be one of the enclosing
  ``pmap``/``shard_map``.
  """
  if axis_name is None:
    return
  try:
    jax.lax.psum(1, axis_name)
  except NameError as e:
    raise ValueError(
        f"{who}: batch_axis_name={axis_name!r} is not an axis of the "
        "enclosing pmap/shard_map (or update was called outside one). Use "
        "the axis_name given to pmap (or a mesh axis of shard_map), or "
        "batch_axis_name=None under jax.jit with a sharded batch, where XLA "
        "averages across devices itself.") from e


def pmean(tree: Any, axis_name: Optional[str], *, who: str) -> Any:
  """``lax.pmean(tree, axis_name)``, or ``tree`` when ``axis_name`` is None."""
  if axis_name is None:
    return tree
  check_axis_bound(axis_name, who)
  return jax.lax.pmean(tree, axis_name)
