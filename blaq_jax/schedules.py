"""Boolean schedules ``step -> bool`` for when BLAQ runs its two-stage update.

The BLAQ appendix activates the two-stage update during one epoch out of every
``m`` and uses plain LAQ otherwise. A boolean schedule of the step count covers
this, and also "every step".

Example:
  >>> from blaq_jax.schedules import one_epoch_every
  >>> active = one_epoch_every(5, steps_per_epoch=100)
  >>> [bool(active(s)) for s in (0, 99, 100, 499, 500)]
  [True, True, False, False, True]
"""

from __future__ import annotations

import jax.numpy as jnp


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
