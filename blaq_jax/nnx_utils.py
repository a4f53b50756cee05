"""Flax NNX helpers: BLAQ's ``grad_fn`` and FOGZO's ``loss_fn`` from a model.

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


def nnx_loss_fn(model: nnx.Module, loss_fn: Callable[..., Any], *args,
                wrt=nnx.Param, has_aux: bool = False, **kwargs):
  """``loss(params) -> scalar`` of ``loss_fn(model, *args, **kwargs)``.

  What FOGZO and n-SPSA need as their ``loss_fn`` extra argument, and what
  :func:`nnx_grad_fn` differentiates.

  Args:
    model: the NNX model being trained (its current non-parameter state,
      e.g. BatchNorm statistics and mode, is used for the forward pass at
      other parameters; any update of it there is discarded).
    loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar`` (or
      ``(scalar, aux)`` with ``has_aux=True``; aux is dropped).
    \\*args: the minibatch and anything else ``loss_fn`` takes.
    \\*\\*kwargs: keyword arguments of ``loss_fn``.
    wrt: the filter of the optimized variables, as given to
      ``nnx.Optimizer(..., wrt=...)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    A function of a pure parameter state (what ``nnx.Optimizer.update``
    passes to the transform as ``params``) returning the scalar loss.
  """
  graphdef, _, rest = nnx.split(model, wrt, ...)
  rest = nnx.as_pure(rest)

  def pure_loss(params):
    out = loss_fn(nnx.merge(graphdef, params, rest), *args, **kwargs)
    return out[0] if has_aux else out

  return pure_loss


def nnx_grad_fn(model: nnx.Module, loss_fn: Callable[..., Any], *args,
                wrt=nnx.Param, has_aux: bool = False, **kwargs):
  """``grad_fn(params) -> grads``: the gradient of :func:`nnx_loss_fn`.

  The arguments are those of :func:`nnx_loss_fn`. The returned function
  takes a pure parameter state and returns a gradient of the same
  structure: BLAQ's ``grad_fn`` extra argument.
  """
  return jax.grad(nnx_loss_fn(model, loss_fn, *args, wrt=wrt,
                              has_aux=has_aux, **kwargs))
