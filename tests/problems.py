"""Shared test problems and method drivers for the blaq_jax tests.

Two halves:

* **Methods**: :data:`METHODS`, one :class:`Method` per configuration the
  conformance suite runs (every name of ``blaq_jax.methods.METHODS``, BLAQ in
  each ``blend`` reading, opaque and transparent), with the extra ``update``
  keyword arguments each one needs (``grad_fn`` for opaque BLAQ, ``loss_fn``
  for FOGZO and n-SPSA), and :func:`extra_kwargs` / :func:`run` to drive any of
  them the same way.
* **Problems**: small losses whose answers are known by hand: a parabola
  whose minimum lies on a method's level set (:func:`level_set_parabola`), a
  Rosenbrock valley whose minimum lies on every level set
  (:func:`rosenbrock`), the paper's Figure 1 toy (:func:`fig1`) with its
  optimum on a level set (:func:`level_set_optimum`), ``c |w|^(3/2)``
  (:func:`three_halves_loss`) and small MLPs with kernels, biases and
  BatchNorm-like leaves (:func:`mlp_problem`, :func:`classifier`).

Everything here uses the public API of blaq_jax only.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import blaq_jax
from blaq_jax.levels import LevelSet

ALL = lambda path, leaf: True  # quantize every leaf  # noqa: E731


# --- methods ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
  """One configuration of a blaq_jax method, as the suite drives it.

  Attributes:
    id: readable test id (``"blaq-lookahead-transparent"``).
    name: key in ``blaq_jax.methods.METHODS``.
    kwargs: keyword arguments of the factory besides ``learning_rate``.
    needs: extra ``update`` keyword arguments it requires (``"grad_fn"``,
      ``"loss_fn"``).
    level_set: the level set of its quantized leaves (``None``: full
      precision).
    fixed_scale: the scale ``alpha`` when the method fixes it (BinaryConnect:
      1), else ``None``.
    transparent: an active step takes two ``update`` calls.
    batch_axis: it takes ``batch_axis_name`` (a second, in-update reduction).
  """

  id: str
  name: str
  kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
  needs: Tuple[str, ...] = ()
  level_set: Optional[LevelSet] = None
  fixed_scale: Optional[float] = None
  transparent: bool = False
  batch_axis: bool = False

  @property
  def factory(self) -> Callable[..., optax.GradientTransformation]:
    return blaq_jax.methods.METHODS[self.name]

  def make(self, learning_rate, **overrides) -> optax.GradientTransformation:
    """The transform, with ``overrides`` on top of :attr:`kwargs`."""
    return self.factory(learning_rate, **{**self.kwargs, **overrides})

  def static_args(self, **overrides) -> Tuple[str, ...]:
    """Arguments ``optax.inject_hyperparams`` must not turn into arrays.

    Ints (bit widths, periods, seeds, iteration caps) and callables (leaf
    selection, schedules of activity) are structural; floats are
    hyperparameters and are injected.
    """
    bound = inspect.signature(self.factory).bind(
        1.0, **{**self.kwargs, **overrides})
    bound.apply_defaults()
    return tuple(sorted(
        k for k, v in bound.arguments.items() if k != "learning_rate" and (
            callable(v) or (isinstance(v, int) and not isinstance(v, bool)))))

  @property
  def quantized(self) -> bool:
    return self.level_set is not None


_ONE_BIT = LevelSet("blaq", 1)
_TERNARY = LevelSet("linear", 2)


def _blaq(blend, transparent, **kwargs):
  kwargs["blend"] = blend
  if transparent:
    kwargs["opaque"] = False
  return Method(
      id=f"blaq-{blend}" + ("-transparent" if transparent else ""),
      name="blaq", kwargs=kwargs, needs=() if transparent else ("grad_fn",),
      level_set=_ONE_BIT, transparent=transparent, batch_axis=True)


METHODS: Tuple[Method, ...] = (
    Method("fp", "fp"),
    Method("laq", "laq", level_set=_ONE_BIT),
    _blaq("moments", False),
    # active=2: the trial runs on even steps, under a traced lax.cond.
    _blaq("lookahead", False, active=2),
    _blaq("gradients", False),
    _blaq("moments", True),
    _blaq("lookahead", True),
    # blend="gradients" has no transparent mode (it needs g_t and g* in one
    # call); blaq() refuses it.
    Method("bc", "bc", level_set=_ONE_BIT, fixed_scale=1.0),
    Method("bwn", "bwn", level_set=_ONE_BIT),
    Method("twn", "twn", level_set=_TERNARY),
    Method("ste-sign", "ste", kwargs=dict(quantizer="sign"),
           level_set=_ONE_BIT),
    Method("ste-uniform2", "ste", kwargs=dict(quantizer="uniform", bits=2),
           level_set=_TERNARY),
    # A decaying beta and the estimator on every second step only.
    Method("fogzo", "fogzo", kwargs=dict(
        beta_min=0.9, beta_decay_steps=10, n=2,
        active=blaq_jax.every_n_steps(2)),
           needs=("loss_fn",), level_set=_ONE_BIT, batch_axis=True),
    Method("n_spsa", "n_spsa", kwargs=dict(n=2), needs=("loss_fn",),
           level_set=_ONE_BIT, batch_axis=True),
)

BY_ID: Dict[str, Method] = {m.id: m for m in METHODS}


def extra_kwargs(method: Method, loss: Callable[[Any], jax.Array]):
  """The extra ``update`` keyword arguments ``method`` needs for ``loss``."""
  kw = {}
  if "grad_fn" in method.needs:
    kw["grad_fn"] = jax.grad(loss)
  if "loss_fn" in method.needs:
    kw["loss_fn"] = loss
  return kw


def start(opt, method: Method, params):
  """``(params on the level set, state)``: where every training run starts.

  A full-precision method starts from ``params`` themselves.
  """
  state = opt.init(params)
  if method.quantized:
    params = blaq_jax.quantized_params(params, state)
  return params, state


def step_fn(opt, method: Method, loss, **update_kwargs):
  """``step(params, state) -> (params, state)``: one ``update`` call."""

  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params,
                                **extra_kwargs(method, loss), **update_kwargs)
    return optax.apply_updates(params, updates), state

  return step


def run(opt, method: Method, params, loss, steps: int):
  """``steps`` jitted ``update`` calls from ``start(opt, params)``, in a scan.

  A transparent BLAQ step is two calls: keep ``steps`` even so that the run
  ends on the real point, not on a trial point.
  """
  params, state = start(opt, method, params)
  step = step_fn(opt, method, loss)

  @jax.jit
  def loop(params, state):
    return jax.lax.scan(lambda c, _: (step(*c), None), (params, state),
                        length=steps)[0]

  return loop(params, state)


# --- problems with answers known by hand --------------------------------------


class Problem(NamedTuple):
  """``loss(params)``, a start and the optimum the method should reach."""

  init: Any
  loss: Callable[[Any], jax.Array]
  optimum: Any


def level_set_parabola(method: Method, dtype=jnp.float32) -> Problem:
  """``|kernel - c|^2 + |bias - b|^2`` with ``c`` on ``method``'s level set.

  ``c = alpha * (every level of the set, in a 2 x 3 kernel)``, with ``alpha =
  0.8`` (or the method's fixed scale): the quantized optimum is ``c`` itself,
  at loss 0, and a method that keeps its params on the level set can reach
  it. ``bias`` is full precision for every method. A full-precision method
  gets the same ``c`` (it is a plain parabola for it).
  """
  level_set = method.level_set or _TERNARY
  alpha = method.fixed_scale or 0.8
  values = np.asarray(level_set.values, np.float64)
  pattern = np.resize(values, 6)[np.array([0, 3, 1, 4, 2, 5])].reshape(2, 3)
  c = jnp.asarray(alpha * pattern, dtype)
  b = jnp.asarray([0.5, -1.0, 0.25], dtype)
  init = {"kernel": jnp.asarray([[0.3, -0.5, 0.1], [-0.2, 0.4, -0.6]], dtype),
          "bias": jnp.zeros(3, dtype)}

  def loss(p):
    return (jnp.sum((p["kernel"] - c).astype(jnp.float32) ** 2)
            + jnp.sum((p["bias"] - b).astype(jnp.float32) ** 2))

  return Problem(init, loss, {"kernel": c, "bias": b})


def rosenbrock(dtype=jnp.float32) -> Problem:
  """A Rosenbrock valley through a quantized kernel and a full-precision bias.

  ``sum_i (1 - k_i)^2 + 100 (b - k_0 k_1)^2`` for a 1 x 2 ``kernel`` ``k``
  and a ``bias`` ``b`` of one entry. The minimum ``k = (1, 1), b = 1`` has
  ``k = alpha (1, 1)``, ``alpha = 1``, on every level set (1-bit, ternary,
  any linear set, BinaryConnect's fixed scale 1 too), so quantized methods
  can reach it. On the 1-bit set ``k = a (s_0, s_1)`` with ``s = (+1, +1)``
  the loss is ``2 (1 - a)^2 + 100 (b - a^2)^2``: Rosenbrock's curved valley
  in ``(a, b)``. The start ``k = (-1.2, 1)``, ``b = 0`` has the wrong sign in
  ``k_0``. (The classic two-variable Rosenbrock is no test for a 1-bit
  method: on ``a (1, 1)`` its two coordinates pull the shared scale in
  opposite directions.)
  """
  init = {"kernel": jnp.asarray([[-1.2, 1.0]], dtype),
          "bias": jnp.zeros((1,), dtype)}

  def loss(p):
    k = p["kernel"][0].astype(jnp.float32)
    b = p["bias"][0].astype(jnp.float32)
    return jnp.sum((1 - k) ** 2) + 100 * (b - k[0] * k[1]) ** 2

  return Problem(init, loss, {"kernel": jnp.ones((1, 2), dtype),
                              "bias": jnp.ones((1,), dtype)})


def quadratic(h, c):
  """``sum_i h_i (w_i - c_i)^2`` over the leaf ``w``."""
  h, c = jnp.asarray(h, jnp.float32), jnp.asarray(c, jnp.float32)
  return lambda p: jnp.sum(h * (p["w"] - c) ** 2)


def level_set_optimum(h, c, values):
  """The minimiser of ``sum h (q - c)^2`` over ``q = alpha s``, ``s_i in Q``.

  For a fixed pattern ``s`` the loss is a parabola in ``alpha`` with minimum
  at ``alpha = sum(h s c) / sum(h s^2)``; try every pattern (brute force,
  numpy, float64) and keep the best with ``alpha > 0``.
  """
  h, c = np.asarray(h, np.float64), np.asarray(c, np.float64)
  best = None
  for s in itertools.product(np.asarray(values, np.float64), repeat=c.size):
    s = np.reshape(s, c.shape)
    if np.sum(h * s * s) == 0:
      continue
    alpha = np.sum(h * s * c) / np.sum(h * s * s)
    value = np.sum(h * (alpha * s - c) ** 2)
    if alpha > 0 and (best is None or value < best[0]):
      best = (value, alpha * s)
  return best[1]


# The paper's Figure 1: 5 (w_0 - .054)^2 + (w_1 + .055)^2 from (-.06, .04).
FIG1_H, FIG1_C, FIG1_START = (5.0, 1.0), (0.054, -0.055), (-0.06, 0.04)
fig1_loss = quadratic(FIG1_H, FIG1_C)


def fig1(method: Optional[Method] = None) -> Problem:
  """The paper's Figure 1 toy, with the optimum on ``method``'s level set.

  On the 1-bit set (and on the ternary one) ``q* = alpha* (1, -1)``,
  ``alpha* = (5 * .054 + .055) / 6``; a full-precision method reaches ``c``.
  """
  if method is None or not method.quantized:
    optimum = np.asarray(FIG1_C)
  else:
    optimum = level_set_optimum(FIG1_H, FIG1_C, method.level_set.values)
  return Problem({"w": jnp.asarray(FIG1_START, jnp.float32)}, fig1_loss,
                 {"w": jnp.asarray(optimum, jnp.float32)})


# f(w) = C |w|^(3/2), whose exact Newton step from q is -q (the appendix's
# toy on which LAQ oscillates forever), and its exact curvature.
THREE_HALVES_C = 2.0


def three_halves_loss(p):
  return THREE_HALVES_C * jnp.abs(p["w"]) ** 1.5


def three_halves_curvature(p):
  return {"w": 0.75 * THREE_HALVES_C * jnp.abs(p["w"]) ** -0.5}


# --- small networks -----------------------------------------------------------


def mlp_problem(seed=0, dtype=jnp.float32, batch_norm=False):
  """A two-layer tanh MLP on 32 random points of 3 classes.

  Returns ``(params, loss(params, x=x, y=y), (x, y))``: kernels ``l1``,
  ``l2`` (quantized by default) and their biases (full precision); with
  ``batch_norm=True`` also a BatchNorm-like ``bn/scale``, ``bn/bias`` pair
  after the first layer (full precision). The loss is softmax cross-entropy
  in float32 whatever the params' dtype.
  """
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  params = {"l1": {"kernel": jax.random.normal(k1, (8, 16)) * 0.3,
                   "bias": jnp.zeros(16)},
            "l2": {"kernel": jax.random.normal(k2, (16, 3)) * 0.3,
                   "bias": jnp.zeros(3)}}
  if batch_norm:
    params["bn"] = {"scale": jnp.ones(16), "bias": jnp.zeros(16)}
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  x = jax.random.normal(k3, (32, 8))
  y = jax.random.randint(k4, (32,), 0, 3)

  def loss(p, x=x, y=y):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    if "bn" in p:
      h = h * p["bn"]["scale"] + p["bn"]["bias"]
    logits = h @ p["l2"]["kernel"] + p["l2"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), y).mean()

  return params, loss, (x, y)


def train_mlp(opt, steps: int):
  """``steps`` jitted ``update`` calls of ``opt`` on :func:`mlp_problem`
  from the level set; ``update`` gets ``loss_fn`` (FOGZO and n-SPSA need
  it, the others ignore it). Returns ``(params, state)``."""
  params, loss, _ = mlp_problem()
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)

  @jax.jit
  def step(p, s):
    return opt.update(jax.grad(loss)(p), s, p, loss_fn=loss)

  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  return params, state


def classifier(n=64, seed=0, dtype=jnp.float32):
  """A one-hidden-layer net with the paper's L2-SVM (squared hinge) loss.

  ``(params, loss(params, x, y), x, y)``. Softmax cross-entropy would not do
  for device-count comparisons: it is invariant to adding a constant to all
  logits, and a 1-bit output row of equal signs then gives a hidden bias a
  gradient of pure rounding noise (~1e-10), which Adam's normalisation turns
  into a step of the learning rate's size.
  """
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  params = {"dense": {"kernel": jax.random.normal(k1, (6, 8)) * 0.3,
                      "bias": jnp.zeros(8)},
            "bn": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
            "out": {"kernel": jax.random.normal(k2, (8, 3)) * 0.3}}
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  x = jax.random.normal(k3, (n, 6), dtype)
  y = jax.random.randint(k4, (n,), 0, 3)

  def loss(p, xb, yb):
    h = jnp.tanh(xb @ p["dense"]["kernel"] + p["dense"]["bias"])
    h = h * p["bn"]["scale"] + p["bn"]["bias"]
    logits = (h @ p["out"]["kernel"]).astype(jnp.float32)
    signs = 2.0 * jax.nn.one_hot(yb, 3) - 1.0
    return jnp.mean(jnp.sum(jnp.maximum(0.0, 1.0 - signs * logits) ** 2, -1))

  return params, loss, x, y
