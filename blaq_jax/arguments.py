"""The options every quantizing method takes, and checks of its arguments.

:func:`with_options` gives each factory of :mod:`blaq_jax.alias` the
engine's options (:func:`blaq_jax.engine.quantized_latent`) as keyword-only
arguments, so that no factory copies them.

Example:
  >>> import inspect, blaq_jax
  >>> inspect.signature(blaq_jax.bwn).parameters["preprocess"].default is None
  True
  >>> check_unit_interval("a", 1.5)
  Traceback (most recent call last):
  ...
  ValueError: a must be a scalar in [0, 1], got 1.5.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Union

import jax
import numpy as np
import optax

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
Active = Union[int, Callable[[jax.Array], Any]]

# Options every quantizing method takes, with their defaults; DROP removes one.
OPTIONS = dict(quantize=None, channel_axis=None, clip_latent=None,
               preprocess=None, diagnostics=False, batch_axis_name=None,
               tol=None, max_iter=None)
DROP = object()


def with_options(**overrides):
  """Gives a method factory the engine's options as keyword-only arguments.

  The factory takes its own arguments and ``**options``; the signature that
  ``inspect``, ``optax.inject_hyperparams`` and the docs see lists both.
  ``overrides`` change or add a default, or remove an option (value
  ``DROP``: ``bc`` has no ``channel_axis``). Unknown keywords are refused.
  """
  defaults = {k: v for k, v in {**OPTIONS, **overrides}.items()
              if v is not DROP}

  def wrap(factory):
    sig = inspect.signature(factory)
    sig = sig.replace(parameters=[
        p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD] + [
            inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
            for k, v in defaults.items()])

    @functools.wraps(factory)
    def call(*args, **kwargs):
      bad = set(kwargs) - set(sig.parameters)
      if bad:
        raise TypeError(f"{factory.__name__}() got unexpected keyword "
                        f"argument(s) {sorted(bad)}.")
      opts = {k: kwargs.pop(k, v) for k, v in defaults.items()}
      return factory(*args, **kwargs, **opts)

    factory.__signature__ = call.__signature__ = sig
    return call

  return wrap


def check_unit_interval(name, value):
  """Raises ValueError unless a static ``value`` is a scalar in [0, 1]."""
  if not (callable(value) or isinstance(value, jax.core.Tracer)) and (
      np.ndim(value) != 0 or not 0.0 <= float(value) <= 1.0):
    raise ValueError(f"{name} must be a scalar in [0, 1], got {value!r}.")


def static_int(name, value, low):
  """``value`` as an int >= ``low``; TypeError for a traced value."""
  if isinstance(value, (jax.Array, jax.core.Tracer)):
    raise TypeError(
        f"{name} must be a static Python int, got a JAX array (a traced or "
        "injected value). Under optax.inject_hyperparams pass it in "
        f"static_args, e.g. inject_hyperparams(blaq_jax.fogzo, "
        f"static_args=('{name}',)).")
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
  return int(value)
