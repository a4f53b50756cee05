"""Flax NNX helper: build BLAQ's ``grad_fn`` from a model and a loss.

BLAQ's opaque mode needs ``grad_fn(params) -> grads``: the gradient of the loss
on the *same* minibatch at the trial parameters. With NNX this means splitting
the model into its parameters and the rest (BatchNorm statistics, RNG
counters), and re-merging with trial parameters inside the function. The rest
must be merged as pure arrays (``nnx.as_pure``): merging the live ``Variable``
objects inside a trace raises ``TraceContextError``. Any state the trial
forward pass would update (BatchNorm running averages) is discarded: the
trial is a look-ahead only.

Example:
  >>> import jax, jax.numpy as jnp, optax, blaq_jax
  >>> from flax import nnx
  >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
  ...                        nnx.BatchNorm(8, rngs=nnx.Rngs(0)),
  ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
  >>> optimizer = nnx.Optimizer(model, blaq_jax.blaq(1e-2), wrt=nnx.Param)
  >>> def loss_fn(model, x, y):
  ...   return jnp.mean((model(x) - y) ** 2)
  >>> @nnx.jit
  ... def train_step(model, optimizer, x, y):
  ...   loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  ...   optimizer.update(model, grads,
  ...                    grad_fn=blaq_jax.nnx_grad_fn(model, loss_fn, x, y))
  ...   return loss
  >>> x, y = jnp.ones((16, 4)), jnp.zeros((16, 2))
  >>> loss = train_step(model, optimizer, x, y)
  >>> bool(jnp.isfinite(loss))
  True
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx


def nnx_grad_fn(model: nnx.Module, loss_fn: Callable[..., Any], *args,
                wrt=nnx.Param, has_aux: bool = False, **kwargs):
  """``grad_fn(params) -> grads`` of ``loss_fn(model, *args, **kwargs)``.

  Args:
    model: the NNX model being trained (its current non-parameter state,
      e.g. BatchNorm statistics and mode, is used for the trial forward pass).
    loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar`` (or
      ``(scalar, aux)`` with ``has_aux=True``; aux is dropped).
    *args, **kwargs: the minibatch and anything else ``loss_fn`` takes.
    wrt: the filter of the optimized variables, as given to
      ``nnx.Optimizer(..., wrt=...)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    A function of a pure parameter state (what ``nnx.Optimizer.update``
    passes to the transform as ``params``) returning the gradient with the
    same structure.
  """
  graphdef, _, rest = nnx.split(model, wrt, ...)
  rest = nnx.as_pure(rest)

  def pure_loss(params):
    trial_model = nnx.merge(graphdef, params, rest)
    out = loss_fn(trial_model, *args, **kwargs)
    return out[0] if has_aux else out

  return jax.grad(pure_loss)
