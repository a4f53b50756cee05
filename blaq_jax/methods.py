"""Every training method of blaq_jax by name, for harnesses that swap methods.

``create(name, learning_rate, **kwargs)`` returns the method's transform.
All transforms accept (and ignore what they do not need of) the keyword
arguments ``grad_fn`` (BLAQ's trial gradient) and ``loss_fn`` (FOGZO's and
n-SPSA's finite differences), so one training step can drive any of them.

Example:
  >>> import blaq_jax
  >>> sorted(blaq_jax.methods.METHODS)[:3]
  ['bc', 'blaq', 'bwn']
  >>> opt = blaq_jax.methods.create("laq", 1e-3, bits=2)
"""

from __future__ import annotations

from typing import Callable, Dict

import optax

from blaq_jax import alias


def _fp(learning_rate, **kwargs):
  """Full-precision Adam (the ``fp`` baseline); quantization args ignored."""
  adam_keys = ("b1", "b2", "eps")
  return optax.adam(learning_rate,
                    **{k: v for k, v in kwargs.items() if k in adam_keys})


METHODS: Dict[str, Callable[..., optax.GradientTransformation]] = {
    "fp": _fp,
    "laq": alias.laq,
    "blaq": alias.blaq,
}

# Which extra keyword arguments of ``update`` each method needs.
NEEDS: Dict[str, tuple] = {"fp": (), "laq": (), "blaq": ("grad_fn",)}


def create(name: str, learning_rate, **kwargs):
  """The transform registered under ``name`` with its keyword arguments."""
  if name not in METHODS:
    raise ValueError(f"Unknown method {name!r}; known: {sorted(METHODS)}.")
  return METHODS[name](learning_rate, **kwargs)


# STE family and zeroth-order baselines.

METHODS.update({
    "bc": alias.binary_connect,
    "bwn": alias.bwn,
    "twn": alias.twn,
    "ste": alias.ste,
    "fogzo": alias.fogzo,
    "n_spsa": alias.n_spsa,
})
NEEDS.update({"bc": (), "bwn": (), "twn": (), "ste": (),
              "fogzo": ("loss_fn",), "n_spsa": ("loss_fn",)})
