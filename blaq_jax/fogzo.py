"""FOGZO and n-SPSA: zeroth-order corrections of the straight-through gradient.

On active steps, finite differences of the quantized network's loss along
random directions replace the STE gradient of the straight-through rule
(:mod:`blaq_jax.ste`): :func:`estimator` is that replacement, and
:func:`fogzo_gradient` the estimate. The transforms are :func:`blaq_jax.fogzo`
and :func:`blaq_jax.n_spsa`; math and the choices the paper leaves open:
``docs/methods.rst``, "FOGZO and n-SPSA".
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from blaq_jax import parallel
from blaq_jax import quantizers
from blaq_jax import schedules
from blaq_jax.arguments import check_unit_interval, static_int
from blaq_jax.state import FOGZOState, cosine, dot
from blaq_jax.ste import Estimator

NORMS = ("global", "per_layer")


def check_estimate_args(n, directions_batch, norm, beta):
  """Validates the arguments :func:`fogzo_gradient` shares with the
  transforms; returns ``n`` and ``directions_batch`` as ints."""
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
  if beta is not None:
    check_unit_interval("beta", beta)
  return static_int("n", n, 1), (
      None if directions_batch is None else
      static_int("directions_batch", directions_batch, 1))


def fogzo_gradient(loss: Callable[[Any], jax.Array], latent, ste_grad, eps,
                   key, *, beta, n: int = 1, noise: str = "identity",
                   norm: str = "global", axis_name: Optional[str] = None,
                   directions_batch: Optional[int] = None):
  """The FOGZO estimate ``G`` at ``latent`` (:ref:`fogzo-rule`).

  .. math:: v_i = \\sqrt{\\beta}\\, s_i\\, \\hat g + \\sqrt{1 - \\beta}\\, u_i,
    \\qquad G = \\frac{1}{n} \\sum_i \\frac{L(w + \\epsilon v_i)
    - L(w - \\epsilon v_i)}{2} \\frac{v_i}{\\epsilon}

  Args:
    loss: ``latent-like pytree -> scalar``.
    latent: pytree of arrays, the point ``w``.
    ste_grad: pytree like ``latent``, the STE gradient ``g`` (only its
      direction is used).
    eps: pytree like ``latent`` of steps broadcastable to each leaf.
    key: a ``jax.random.PRNGKey``.
    beta: weight of the STE direction in ``[0, 1]`` (``0``: n-SPSA).
    n: number of directions (``2 n`` evaluations of ``loss``).
    noise: the surrogate whose noise ``u`` is drawn.
    norm: ``"global"`` or ``"per_layer"`` normalisation of ``eps * g``.
    axis_name: average the finite differences over this mapped axis.
    directions_batch: evaluate this many directions at once under ``vmap``
      (``None``: one at a time).

  Returns:
    ``(G, fds)``: the estimate (pytree like ``latent``) and the ``n`` finite
    differences ``(L(w + eps v_i) - L(w - eps v_i)) / 2``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from blaq_jax.fogzo import fogzo_gradient
    >>> loss = lambda w: jnp.sum(w["a"] ** 2)  # gradient 2 w
    >>> w = {"a": jnp.array([1.0, -2.0])}
    >>> G, fds = fogzo_gradient(loss, w, {"a": jnp.array([0.5, -1.0])},
    ...                         {"a": 0.1}, jax.random.PRNGKey(0), beta=1.0)
    >>> # beta = 1: the gradient projected on the STE direction, (2, -4)
    >>> jnp.round(G["a"], 4).tolist()
    [2.0, -4.0]
  """
  n, directions_batch = check_estimate_args(n, directions_batch, norm, beta)
  quantizers.check_surrogate(noise, where="noise")
  w, treedef = jax.tree.flatten(latent)
  w = [x.astype(jnp.float32) for x in w]
  g = [x.astype(jnp.float32) for x in treedef.flatten_up_to(ste_grad)]
  e = [jnp.broadcast_to(jnp.asarray(x, jnp.float32), y.shape)
       for x, y in zip(treedef.flatten_up_to(eps), w)]
  gx = [a * b for a, b in zip(g, e)]

  def unit(xs, scale=1.0):
    norm2 = sum((dot(x, x) for x in xs), jnp.float32(0))
    inv = jnp.where(norm2 > 0, scale / jnp.sqrt(jnp.where(norm2 > 0, norm2,
                                                          1.0)), 0.0)
    return [x * inv for x in xs]

  if norm == "global":
    g_hat = unit(gx)
  else:
    total = float(sum(x.size for x in w))
    g_hat = [unit([x], math.sqrt(x.size / total))[0] for x in gx]
  beta = jnp.asarray(beta, jnp.float32)
  sb, sn = jnp.sqrt(beta), jnp.sqrt(1.0 - beta)

  def direction(k):
    ks, ku = jax.random.split(k)
    s = jax.random.rademacher(ks, (), jnp.float32)
    return [sb * s * gh + sn * quantizers.sample_noise(
        noise, jax.random.fold_in(ku, j), x.shape)
            for j, (gh, x) in enumerate(zip(g_hat, w))]

  def evaluate(v):
    def at(sign):
      value = loss(treedef.unflatten(
          [x + sign * ei * vi for x, ei, vi in zip(w, e, v)]))
      if jnp.shape(value) != ():
        raise ValueError(f"loss_fn must return a scalar, got shape "
                         f"{jnp.shape(value)}.")
      return jnp.asarray(value, jnp.float32)
    fd = (at(1.0) - at(-1.0)) / 2
    return parallel.pmean(fd, axis_name, who="fogzo_gradient")

  def add(acc, v, fd):
    return [a + fd * vi for a, vi in zip(acc, v)]

  keys = jax.random.split(key, n)
  zeros = [jnp.zeros_like(x) for x in w]
  if directions_batch in (None, 1):  # one scan: each direction drawn once
    def body(acc, k):
      v = direction(k)
      fd = evaluate(v)
      return add(acc, v, fd), fd
    acc, fds = jax.lax.scan(body, zeros, keys)
  else:  # the losses batched, then the directions drawn again to sum them
    fds = jax.lax.map(lambda k: evaluate(direction(k)), keys,
                      batch_size=directions_batch)
    acc, _ = jax.lax.scan(lambda acc, kf: (add(acc, direction(kf[0]), kf[1]),
                                           None), zeros, (keys, fds))
  return treedef.unflatten([a / (n * ei) for a, ei in zip(acc, e)]), fds



def estimator(*, beta, beta_min, beta_decay_steps, n, eps_scale, norm,
              active, seed, directions_batch, axis_name) -> Estimator:
  """FOGZO's :class:`~blaq_jax.ste.Estimator` (n-SPSA's: ``beta = 0``), for
  arguments :func:`blaq_jax.fogzo` has checked (its docstring says what
  they mean); ``axis_name`` averages the finite differences over devices."""

  def beta_at(count):
    if beta is not None:
      return jnp.asarray(beta(count) if callable(beta) else beta,
                         jnp.float32)
    steps = jnp.asarray(beta_decay_steps, jnp.float32)
    frac = jnp.where(steps > 0, jnp.minimum(
        jnp.asarray(count, jnp.float32) / jnp.maximum(steps, 1.0), 1.0), 1.0)
    return 1.0 - (1.0 - jnp.asarray(beta_min, jnp.float32)) * frac

  def init():
    z = jnp.zeros([], jnp.float32)
    return FOGZOState(jax.random.PRNGKey(seed), jnp.zeros([], jnp.bool_), z,
                      z, z)

  def update(state, *, count, grads, latent, steps, surrogate,
             perturbed_params, extra_args):
    key, sub = jax.random.split(state.key)
    b = beta_at(count)
    eps = [eps_scale * quantizers.EPS_BAR[surrogate] * s for s in steps]

    def zo(_):
      loss_fn = extra_args["loss_fn"]
      est, fds = fogzo_gradient(
          lambda ws: loss_fn(perturbed_params(ws)), latent, grads, eps, sub,
          beta=b, n=n, noise=surrogate, norm=norm,
          axis_name=axis_name,
          directions_batch=directions_batch)
      return est, jnp.mean(jnp.abs(fds))

    on = schedules.is_active(active, count)
    est, fd = schedules.select(
        on, zo, lambda _: (list(grads), jnp.zeros([], jnp.float32)), None)
    on = jnp.asarray(on, jnp.bool_)
    return est, FOGZOState(key, on, b, fd, cosine(est, grads)), (
        2 * n * on.astype(jnp.int32))

  return Estimator(init, update, ("loss_fn",))
