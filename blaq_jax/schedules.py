"""Boolean schedules ``step -> bool`` for when BLAQ runs its two-stage update.

The BLAQ appendix activates the two-stage update during one epoch out of every
``m`` and uses plain LAQ otherwise. A boolean schedule of the step count covers
this, and also "every step". A method's ``active`` argument (BLAQ's trial,
FOGZO's zeroth-order estimate) is such a schedule or an int period:
:func:`is_active` reads it, :func:`select` runs the stage where it is on.

Example:
  >>> from blaq_jax.schedules import one_epoch_every
  >>> active = one_epoch_every(5, steps_per_epoch=100)
  >>> [bool(active(s)) for s in (0, 99, 100, 499, 500)]
  [True, True, False, False, True]
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _check_positive(name, value):
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")


def every_n_steps(n: int, offset: int = 0):
  """Active on steps ``offset, offset + n, offset + 2n, ...``."""
  _check_positive("n", n)

  def schedule(step):
    return jnp.asarray(step) % n == offset % n

  return schedule


def one_epoch_every(m: int, steps_per_epoch: int, epoch_offset: int = 0):
  """Active for the whole of epochs ``epoch_offset (mod m)``: one in ``m``.

  The paper's defaults are ``m = 5`` (MNIST, SVHN, CIFAR-10) and ``m = 10``
  (ImageNet). ``m = 1`` is every step.
  """
  _check_positive("m", m)
  _check_positive("steps_per_epoch", steps_per_epoch)

  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    return epoch % m == epoch_offset % m

  return schedule


def never(step):
  """Never active: BLAQ with this schedule is exactly LAQ (no trial traced)."""
  del step
  return False


def check_active(active):
  """Raises ValueError unless ``active`` is a period >= 1 or a callable."""
  if isinstance(active, (bool, np.bool_)) or not (
      callable(active) or isinstance(active, (jax.Array, jax.core.Tracer))
      or (isinstance(active, (int, np.integer)) and active >= 1)):
    raise ValueError(
        "active must be a positive int period (1 = every step) or a callable "
        f"step -> bool, got {active!r}.")


def is_active(active, count):
  """Whether an optional stage runs at ``count``: True, False or traced."""
  if callable(active):
    on = active(count)
    return bool(on) if isinstance(on, (bool, np.bool_)) else jnp.asarray(
        on, jnp.bool_)
  return True if isinstance(active, (int, np.integer)) and active == 1 else (
      count % active == 0)


def select(on, if_on: Callable, if_off: Callable, x):
  """``if_on(x)`` or ``if_off(x)`` for :func:`is_active`'s value (a traced
  one with ``lax.cond``: only the branch taken runs)."""
  if on is True or on is False:
    return if_on(x) if on else if_off(x)
  return jax.lax.cond(on, if_on, if_off, x)
