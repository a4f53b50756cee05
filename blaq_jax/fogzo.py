"""FOGZO and n-SPSA: zeroth-order corrections of the straight-through gradient.

On active steps, finite differences of the quantized network's loss along
random directions replace the STE gradient of :mod:`blaq_jax.ste`. Math and
the choices the paper leaves open: ``docs/methods.rst``, "FOGZO and n-SPSA".
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blaq_jax import engine
from blaq_jax import parallel
from blaq_jax import quantizers
from blaq_jax.state import cosine, dot
from blaq_jax.ste import STE_OPTIONS, Estimator, ScalarOrSchedule
from blaq_jax.ste import straight_through

NORMS = ("global", "per_layer")
Active = Union[int, Callable[[jax.Array], Any]]


class FOGZOState(NamedTuple):
  """State of the estimator of :func:`fogzo` / :func:`n_spsa`.

  Attributes:
    key: the PRNG key (``jax.random.PRNGKey`` data), split once per step.
    active: whether the last step used the zeroth-order estimate.
    beta: ``beta`` of the last step.
    finite_difference: mean of ``|L(w + eps v) - L(w - eps v)| / 2`` over
      the directions of the last step (0 on inactive steps).
    grad_cosine: cosine between the gradient given to the inner optimizer
      and the STE gradient, quantized leaves together (1 on STE steps).
  """

  key: jax.Array
  active: jax.Array
  beta: jax.Array
  finite_difference: jax.Array
  grad_cosine: jax.Array


def _static_int(name, value, low):
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


def _check_estimate_args(n, directions_batch, norm, beta):
  """Validates the arguments :func:`fogzo_gradient` shares with the
  transforms; returns ``n`` and ``directions_batch`` as ints."""
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
  if beta is not None:
    engine.check_unit_interval("beta", beta)
  return _static_int("n", n, 1), (
      None if directions_batch is None else
      _static_int("directions_batch", directions_batch, 1))


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
  n, directions_batch = _check_estimate_args(n, directions_batch, norm, beta)
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


def _zeroth_order(learning_rate, *, beta, beta_min, beta_decay_steps, n,
                  eps_scale, norm, active, seed, directions_batch, who,
                  **ste_options):
  """The STE transform whose estimator is FOGZO (n-SPSA: ``beta = 0``)."""
  n, directions_batch = _check_estimate_args(n, directions_batch, norm, beta)
  engine.check_unit_interval("beta_min", beta_min)
  if not isinstance(beta_decay_steps, (jax.Array, jax.core.Tracer)):
    _static_int("beta_decay_steps", beta_decay_steps, 0)
  if not isinstance(eps_scale, jax.core.Tracer) and not (
      np.ndim(eps_scale) == 0 and float(eps_scale) > 0):
    raise ValueError(f"eps_scale must be a positive scalar, got "
                     f"{eps_scale!r}.")
  engine.check_active(active)
  if isinstance(seed, (bool, np.bool_)) or not isinstance(
      seed, (int, np.integer, jax.Array)):
    raise TypeError(f"seed must be an int, got {seed!r}.")

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
          axis_name=ste_options.get("batch_axis_name"),
          directions_batch=directions_batch)
      return est, jnp.mean(jnp.abs(fds))

    on = engine.is_active(active, count)
    est, fd = engine.select(
        on, zo, lambda _: (list(grads), jnp.zeros([], jnp.float32)), None)
    on = jnp.asarray(on, jnp.bool_)
    return est, FOGZOState(key, on, b, fd, cosine(est, grads)), (
        2 * n * on.astype(jnp.int32))

  return straight_through(learning_rate, who=who, **ste_options,
                          estimator=Estimator(init, update, ("loss_fn",)))


@engine.with_options(**STE_OPTIONS)
def fogzo(learning_rate: Optional[ScalarOrSchedule], *,
          beta_min: float = 0.999, beta_decay_steps: int = 0,
          beta: Optional[ScalarOrSchedule] = None, n: int = 1,
          eps_scale: float = 1.0, norm: str = "global", active: Active = 1,
          seed: int = 0, directions_batch: Optional[int] = None,
          **options) -> optax.GradientTransformationExtraArgs:
  """First-order-guided zeroth-order training (Yang & Aamodt, 2025).

  :func:`blaq_jax.ste` whose STE gradient of the quantized leaves is replaced
  on active steps by the estimate ``G`` of :func:`blaq_jax.fogzo_gradient`
  (:ref:`fogzo-rule`). ``update`` needs ``loss_fn(params) -> scalar``, the
  loss on the gradient's minibatch, and calls it ``2 n`` times.

  .. math:: G = \\frac{1}{n} \\sum_i \\frac{L(w + \\epsilon v_i)
    - L(w - \\epsilon v_i)}{2 \\epsilon} v_i,\\quad
    v_i = \\sqrt{\\beta_t}\\, s_i\\, \\hat g + \\sqrt{1 - \\beta_t}\\, u_i

  Args:
    learning_rate: of the default inner Adam.
    beta_min: ``beta`` decays linearly from 1 to ``beta_min`` over
      ``beta_decay_steps`` steps, then stays (the paper's MNIST run: 0.999;
      ``1 - beta`` of order ``1 / d`` for ``d`` weights).
    beta_decay_steps: length of the decay (``0``: constant ``beta_min``).
    beta: overrides the decay: a float in ``[0, 1]`` or a schedule.
    n: random directions per active step (static int >= 1).
    eps_scale: multiplies ``eps = eps_bar * step``.
    norm: ``"global"`` or ``"per_layer"`` normalisation of the STE direction.
    active: an int period (1 = every step) or ``step -> bool``, e.g.
      ``lambda s: s % 10 < 3``; other steps are plain STE steps.
    seed: seed of the PRNG key kept in the state.
    directions_batch: evaluate that many directions at once with ``vmap``
      (``loss_fn`` must be vmappable).
    **options: :func:`blaq_jax.ste`'s arguments (``surrogate`` also picks
      ``eps_bar`` and the noise) and the engine's options
      (``batch_axis_name`` averages the finite differences over devices).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its rule state is an
    ``STEState`` whose estimator is a ``FOGZOState``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blaq_jax
    >>> target = jnp.array([[0.7, -0.6], [0.9, -0.8]])
    >>> loss = lambda p: jnp.sum((p["kernel"] - target) ** 2)
    >>> params = {"kernel": jnp.array([[0.1, 0.2], [-0.1, 0.1]])}
    >>> opt = blaq_jax.fogzo(0.05, beta_min=0.9, seed=0)
    >>> state = opt.init(params)
    >>> for _ in range(30):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params,
    ...                               loss_fn=loss)
    ...   params = optax.apply_updates(params, updates)
    >>> jnp.sign(params["kernel"]).tolist()
    [[1.0, -1.0], [1.0, -1.0]]
  """
  return _zeroth_order(
      learning_rate, beta=beta, beta_min=beta_min,
      beta_decay_steps=beta_decay_steps, n=n, eps_scale=eps_scale, norm=norm,
      active=active, seed=seed, directions_batch=directions_batch,
      who="fogzo", **options)


@engine.with_options(**STE_OPTIONS)
def n_spsa(learning_rate: Optional[ScalarOrSchedule], *, n: int = 1,
           eps_scale: float = 1.0, seed: int = 0,
           directions_batch: Optional[int] = None,
           **options) -> optax.GradientTransformationExtraArgs:
  """n-SPSA, the zeroth-order baseline: :func:`fogzo` with ``beta = 0``.

  .. math:: G = \\frac{1}{n} \\sum_{i=1}^n
    \\frac{L(w + \\epsilon u_i) - L(w - \\epsilon u_i)}{2 \\epsilon} u_i

  The gradient given to ``update`` is used only at full-precision leaves
  (pass zeros to skip the backward pass). Needs ``loss_fn``.

  Args:
    learning_rate, n, eps_scale, seed, directions_batch: as in
      :func:`fogzo`.
    \\*\\*options: as in :func:`fogzo`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blaq_jax
    >>> loss = lambda p: jnp.sum((p["kernel"] - 1.0) ** 2)
    >>> params = {"kernel": jnp.array([[0.5, -0.5, 0.5]])}
    >>> opt = blaq_jax.n_spsa(0.1, n=4)
    >>> zeros = jax.tree.map(jnp.zeros_like, params)
    >>> _, state = opt.update(zeros, opt.init(params), params, loss_fn=loss)
    >>> [float(optax.tree.get(state, k)) for k in ("active", "beta")]
    [1.0, 0.0]
  """
  return _zeroth_order(
      learning_rate, beta=0.0, beta_min=0.0, beta_decay_steps=0, n=n,
      eps_scale=eps_scale, norm="global", active=1, seed=seed,
      directions_batch=directions_batch, who="n_spsa", **options)
