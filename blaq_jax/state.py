"""Optimizer state shared by every blaq_jax transform, and accessors for it.

The model only ever sees the quantized weights ``q = alpha * beta``. Everything
else lives in the optimizer state:

* :class:`QuantizedLatentState`, the state of every quantizing transform:
  the latent full-precision weights ``w`` (``latent``), the scales, the
  method's own state (``rule``: :class:`LossAwareState` for LAQ and BLAQ,
  :class:`STEState` for the STE family, FOGZO and n-SPSA) and the opt-in
  diagnostics.
* :class:`LeafScale`: the scale(s) ``alpha`` of one quantized leaf, with its
  level set and scale granularity as static metadata. The codes follow from
  ``w`` and ``alpha`` and are stored only where a step reads the last ones
  (diagnostics, a converging multi-bit projection): one byte per weight less
  state, and no pass that writes them each step.
* :class:`QuantizedTensor`: the codes (indices of ``beta`` in the level set)
  and the scale(s) of one leaf, as :func:`quantized_tensors` derives them;
  ``dequantize()`` gives ``q``.

Leaves that are trained in full precision hold ``optax.MaskedNode()`` in the
per-leaf trees (``latent``, ``quantized``, ...), so those trees keep the
params' structure.

Example:
  >>> import jax.numpy as jnp, optax, blaq_jax
  >>> params = {"dense": {"kernel": jnp.array([[0.3, -0.1], [0.2, -0.4]]),
  ...                     "bias": jnp.zeros(2)}}
  >>> opt = blaq_jax.laq(1e-3)
  >>> state = opt.init(params)
  >>> q = blaq_jax.quantized_params(params, state)  # quantized start point
  >>> q["dense"]["kernel"].tolist()
  [[0.25, -0.25], [0.25, -0.25]]
  >>> blaq_jax.codes(state)["dense"]["kernel"].tolist()
  [[1, 0], [1, 0]]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blaq_jax.arguments import ScalarOrSchedule
from blaq_jax.levels import LevelSet
from blaq_jax import selection
from blaq_jax.projection import (alpha_times, dequantize, encode,
                                 fused_sums, nearest_levels)


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
  """Codes and scale(s) of one quantized leaf: ``q = alpha * Q[codes]``.

  Attributes:
    codes: ``uint8`` array of the leaf's shape, indices into
      ``level_set.values``.
    alpha: ``float32`` scale, shape ``()`` (per tensor) or ``(C,)`` (per
      slice of ``channel_axis``).
    level_set: the :class:`~blaq_jax.levels.LevelSet` (static).
    channel_axis: ``None`` for a per-tensor scale, else the scaled axis
      (static).
  """

  codes: Any
  alpha: Any
  level_set: LevelSet = dataclasses.field(default_factory=LevelSet)
  channel_axis: Optional[int] = None

  def dequantize(self, dtype=jnp.float32):
    """The quantized weights ``alpha * beta``."""
    return dequantize(self.alpha, self.codes, self.level_set,
                      self.channel_axis, dtype)

  @property
  def bits(self) -> int:
    return self.level_set.bits


jax.tree_util.register_dataclass(
    QuantizedTensor, data_fields=["codes", "alpha"],
    meta_fields=["level_set", "channel_axis"])


@dataclasses.dataclass(frozen=True)
class LeafScale:
  """What the state keeps of a quantized leaf besides its latent weights.

  Attributes:
    alpha: ``float32`` scale, shape ``()`` or ``(C,)``.
    unit: None, or the divisor of the codes where it is not ``alpha``
      (TWN: ``2 delta``); see :func:`~blaq_jax.projection.encode`.
    codes: None, or the codes of the stored latent weights, kept where a
      step reads the last codes (``diagnostics=True``; a multi-bit
      projection that converges, ``tol > 0``, starts from them).
    level_set: the :class:`~blaq_jax.levels.LevelSet` (static).
    channel_axis: ``None`` or the scaled axis (static).
  """

  alpha: Any
  unit: Any = None
  codes: Any = None
  level_set: LevelSet = dataclasses.field(default_factory=LevelSet)
  channel_axis: Optional[int] = None

  def at(self, w) -> QuantizedTensor:
    """The :class:`QuantizedTensor` of latent weights ``w``."""
    codes = self.codes if self.codes is not None else encode(
        w, self.alpha, self.level_set, self.channel_axis, self.unit)
    return QuantizedTensor(codes, self.alpha, self.level_set,
                           self.channel_axis)

  def dequantize(self, w, dtype=jnp.float32):
    """``q = alpha * beta`` of latent weights ``w``: ``at(w).dequantize()``,
    with no integer codes formed unless they are stored."""
    if self.codes is not None:
      return self.at(w).dequantize(dtype)
    beta = nearest_levels(w, self.alpha, self.level_set, self.channel_axis,
                          self.unit)
    return alpha_times(self.alpha, beta, self.channel_axis, dtype)


jax.tree_util.register_dataclass(
    LeafScale, data_fields=["alpha", "unit", "codes"],
    meta_fields=["level_set", "channel_axis"])


class Diagnostics(NamedTuple):
  """Cheap per-step zig-zag statistics (read with ``optax.tree.get``).

  Attributes:
    flip_fraction: fraction of quantized entries whose level changed in the
      last real step.
    update_cosine: cosine between the last two latent updates (all quantized
      leaves together); near -1 means zig-zag. 0 when either is zero.
    trial_active: whether the last step ran the trial (two-stage) update.
    trial_flip_fraction: fraction of quantized entries whose trial level
      ``q*`` differs from ``q_t`` (0 on inactive steps).
    trial_grad_cosine: cosine between the gradient at ``q_t`` and the trial
      gradient at ``q*`` (0 on inactive steps).
  """

  flip_fraction: jax.Array
  update_cosine: jax.Array
  trial_active: jax.Array
  trial_flip_fraction: jax.Array
  trial_grad_cosine: jax.Array


class StepCost(NamedTuple):
  """What the last step cost in evaluations of the model (read with
  :func:`step_cost`, or ``optax.tree.get(state, "gradient_evaluations")``).

  Attributes:
    gradient_evaluations: gradients used by the last step, the one passed to
      ``update`` included (BLAQ's active steps: 2), int32.
    loss_evaluations: extra loss evaluations of the last step (FOGZO:
      ``2 n`` on active steps), int32.
  """

  gradient_evaluations: jax.Array
  loss_evaluations: jax.Array


def make_cost(gradients=1, losses=0) -> StepCost:
  return StepCost(jnp.asarray(gradients, jnp.int32),
                  jnp.asarray(losses, jnp.int32))


def step_cost(opt_state) -> StepCost:
  """The :class:`StepCost` of the last step of any optimizer state.

  A state without one (a plain Optax optimizer) used one gradient and no
  extra loss evaluation.

  Example:
    >>> import jax.numpy as jnp, optax, blaq_jax
    >>> int(blaq_jax.step_cost(optax.adam(1e-3).init(jnp.zeros(2)))
    ...     .gradient_evaluations)
    1
  """
  g = optax.tree.get(opt_state, "gradient_evaluations", default=None)
  if g is None:
    return make_cost()
  return StepCost(g, optax.tree.get(opt_state, "loss_evaluations"))


def init_diagnostics() -> Diagnostics:
  # One array per field: a training loop that donates the state must not
  # find one buffer in two places.
  z = lambda: jnp.zeros([], jnp.float32)  # noqa: E731
  return Diagnostics(z(), z(), jnp.zeros([], jnp.bool_), z(), z())


def dot(x, y):
  """``sum(x * y)`` over all axes.

  Unlike ``jnp.vdot`` it does not flatten: flattening a tensor sharded over
  two mesh axes makes XLA gather it.
  """
  return jnp.sum(x * y, dtype=jnp.float32)


def cosine(xs, ys):
  """Cosine of two lists of arrays seen as one vector (0 if either is 0)."""
  xy = nx = ny = jnp.float32(0)
  for x, y in zip(xs, ys):  # the three sums of a pair in one pass over it
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    sxy, sxx, syy = fused_sums([x * y, x * x, y * y], tuple(range(x.ndim)))
    xy, nx, ny = xy + sxy, nx + sxx, ny + syy
  den = jnp.sqrt(nx * ny)
  return jnp.where(den > 0, xy / jnp.where(den > 0, den, 1.0), 0.0)


def fraction_changed(new, old, total):
  """Fraction of the ``total`` entries of ``new`` that differ from ``old``."""
  if not total:
    return jnp.zeros([], jnp.float32)
  # Counted in float32 (exact to 2^24 per leaf, ample for a fraction) as
  # min((a - b)^2, 1): XLA:CPU reduces that straight from the codes, while a
  # comparison (a != b) is first written out as a float32 array.
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  n = sum(jnp.sum(jnp.minimum(jnp.square(f32(a) - f32(b)), 1.0))
          for a, b in zip(new, old))
  return n / total


def _is_qt(x):
  return isinstance(x, QuantizedTensor)


def _is_scale(x):
  return isinstance(x, LeafScale)


def find_state(opt_state, field: str):
  """The unique ``field`` of a blaq_jax state nested anywhere in opt_state."""
  found = []

  def visit(node):
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      if field in node._fields and "latent" in node._fields:
        found.append(getattr(node, field))
        return
      for child in node:
        visit(child)
    elif isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
    elif isinstance(node, dict):
      for child in node.values():
        visit(child)
    elif hasattr(node, "inner_state"):
      visit(node.inner_state)

  visit(opt_state)
  if len(found) != 1:
    raise ValueError(
        f"Expected exactly one blaq_jax optimizer state inside opt_state, "
        f"found {len(found)}.")
  return found[0]


def latent_params(opt_state):
  """The latent full-precision weights (MaskedNode at full-precision leaves)."""
  return find_state(opt_state, "latent")


def quantized_tensors(opt_state):
  """Tree of :class:`QuantizedTensor` (MaskedNode at full-precision leaves).

  The codes are derived from the latent weights and the scales.
  """
  # Leaf lists, not a tree map: under Flax NNX the latent tree keeps the
  # params' variable wrappers and the scale tree does not.
  scales_, treedef = jax.tree.flatten(find_state(opt_state, "quantized"),
                                      is_leaf=_is_scale)
  latent = jax.tree.leaves(latent_params(opt_state))
  return treedef.unflatten(
      [s.at(w) for s, w in zip(scales_, latent, strict=True)])


def codes(opt_state):
  """Tree of uint8 codes of the quantized leaves."""
  return jax.tree.map(lambda t: t.codes, quantized_tensors(opt_state),
                      is_leaf=_is_qt)


def scales(opt_state):
  """Tree of the scales ``alpha`` of the quantized leaves."""
  return jax.tree.map(lambda t: t.alpha, find_state(opt_state, "quantized"),
                      is_leaf=_is_scale)


def quantized_params(params, opt_state):
  """``params`` with every quantized leaf replaced by ``alpha * beta``.

  Right after ``init`` this is the quantized starting point of a float
  initialisation; after any update it equals ``params`` up to an ulp.
  """
  treedef = jax.tree.structure(params)
  qt = selection.pure_structure(params).flatten_up_to(
      quantized_tensors(opt_state))
  leaves = [t.dequantize(jnp.result_type(p)) if _is_qt(t) else p
            for p, t in zip(treedef.flatten_up_to(params), qt)]
  return treedef.unflatten(leaves)


def is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


# The layouts of the transforms' states: the engine's, and each rule's.

MASK = optax.MaskedNode()


@functools.partial(jax.tree_util.register_dataclass, data_fields=[],
                   meta_fields=["paths", "shapes", "level_sets"])
@dataclasses.dataclass(frozen=True)
class Layout:
  """The params a state was made for (static): names a changed leaf."""

  paths: tuple
  shapes: tuple
  level_sets: tuple

  @classmethod
  def of(cls, params, level_sets):
    """The layout of ``params`` whose leaves have these level sets."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return cls(tuple(selection.path_str(p) for p, _ in flat),
               tuple((tuple(jnp.shape(x)), str(jnp.result_type(x)))
                     for _, x in flat), tuple(level_sets))


class DiagnosticsState(NamedTuple):
  """Opt-in diagnostics (``diagnostics=True``).

  Attributes:
    stats: :class:`Diagnostics` of the last step.
    prev_update: the last latent update of quantized leaves.
  """

  stats: Diagnostics
  prev_update: Any


class QuantizedLatentState(NamedTuple):
  """State of every quantizing transform of blaq_jax.

  Attributes:
    count: number of completed steps, int32.
    latent: latent weights ``w`` (MaskedNode at full-precision leaves).
    quantized: :class:`LeafScale` of ``q_t`` at quantized
      leaves (MaskedNode elsewhere); its codes follow from ``latent``.
    rule: the method's own state (Adam moments for LAQ/BLAQ, ...).
    preprocess: state of the ``preprocess`` transform.
    skipped_steps: steps skipped because a gradient was not finite, int32.
    cost: :class:`StepCost` of the last step.
    diagnostics: :class:`DiagnosticsState` with ``diagnostics=True``, else
      ``optax.EmptyState()``.
    layout: :class:`Layout` (static).
  """

  count: jax.Array
  latent: Any
  quantized: Any
  rule: Any
  preprocess: Any
  skipped_steps: jax.Array
  cost: StepCost
  diagnostics: Any
  layout: Layout


def check_state(state, new, params, grads, who):
  """Raises ValueError, naming the optimizer ``who`` and the leaf, unless
  ``state`` is a :class:`QuantizedLatentState` made for params of layout
  ``new`` (paths, shapes, dtypes, level sets) and ``grads`` match them."""
  if not isinstance(state, QuantizedLatentState):
    fields = getattr(state, "_fields", ())
    v01 = ("mu" in fields or "inner" in fields) and "latent" in fields
    raise ValueError(
        f"{who}: the optimizer state is a {type(state).__name__}, not a "
        "QuantizedLatentState" + (
            ": it has the layout of blaq_jax 0.1 (LossAwareState/STEState),"
            " which this version cannot read. Create the state anew with "
            "init() (a checkpoint of the old layout cannot be resumed)."
            if v01 else "; was it created by another optimizer?"))
  old = state.layout
  if old.paths != new.paths:
    raise ValueError(
        f"{who}: params do not match the optimizer state: leaves only in "
        f"params: {sorted(set(new.paths) - set(old.paths))}, only in "
        f"the state: {sorted(set(old.paths) - set(new.paths))}.")
  selection.check_same_structure(params, grads, f"{who}: the gradient")
  for path, a, b, sa, sb, g in zip(new.paths, old.shapes, new.shapes,
                                   old.level_sets, new.level_sets,
                                   jax.tree.leaves(grads)):
    if a != b:
      raise ValueError(
          f"{who}: leaf '{path}' has shape {b[0]} and dtype {b[1]}, but the "
          f"optimizer state was made for shape {a[0]} and dtype {a[1]}.")
    if sa != sb:
      raise ValueError(
          f"{who}: the state does not match this optimizer's "
          f"configuration at leaf '{path}' (state: {sa}, optimizer: {sb});"
          " was it created by another config?")
    if tuple(jnp.shape(g)) != b[0]:
      raise ValueError(f"{who}: the gradient of leaf '{path}' has shape "
                       f"{jnp.shape(g)}, the params {b[0]}.")


class TrialState(NamedTuple):
  """BLAQ's trial (one-step-forward) state.

  Attributes:
    pending: transparent mode: True after a call that moved the params to
      the trial point ``q*``; the next call brings ``g*`` (else False).
    real_grad: transparent mode: the real gradient ``g_t`` of quantized
      leaves, kept for that second call (else MaskedNode).
    trial_latent, trial_grad: ``w*`` and ``g*`` of the last active step at
      quantized leaves (with ``keep_trial=True``, else MaskedNode).
  """

  pending: jax.Array
  real_grad: Any
  trial_latent: Any
  trial_grad: Any


class LossAwareState(NamedTuple):
  """The rule state of :func:`laq` and :func:`blaq` (field ``rule`` of
  :class:`QuantizedLatentState`).

  Attributes:
    mu: Adam first moments of every leaf (at quantized leaves, of the
      gradient w.r.t. ``q``).
    sqrt_nu: ``sqrt(v)`` of Adam's second moments (roots, so that the
      projection's ``D``-weighted sums run no square root).
    trial: :class:`TrialState` (``optax.EmptyState()`` for LAQ).

  ``D`` is not stored: :func:`curvature` computes it.
  """

  mu: Any
  sqrt_nu: Any
  trial: Any


class STEState(NamedTuple):
  """The rule state of the STE family, FOGZO and n-SPSA.

  Attributes:
    inner: state of the inner Optax optimizer (its params: the latent weights
      at quantized leaves, the params elsewhere).
    estimator: :class:`FOGZOState`, or ``optax.EmptyState()``
      for plain STE.
  """

  inner: Any
  estimator: Any


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


def curvature(opt_state, learning_rate: ScalarOrSchedule, *, b2: float = 0.999,
              eps: float = 1e-8):
  """The diagonal curvature ``D = (eps + sqrt(v_hat)) / eta`` of the state.

  Uses the stored ``sqrt_nu`` and count; ``b2``/``eps`` must be those of
  the transform. Returned for every leaf.
  """
  count = find_state(opt_state, "count")
  sqrt_nu = optax.tree.get(opt_state, "sqrt_nu")
  lr = learning_rate(count) if callable(learning_rate) else learning_rate
  c = jax.lax.rsqrt(1 - b2 ** count.astype(jnp.float32))
  return jax.tree.map(lambda s: (eps + s * c) / lr, sqrt_nu)


def check_on_level_set(params, opt_state, *, ulps: float = 4.0) -> None:
  """Raises ValueError unless ``params`` are the state's quantized weights.

  Cheap (one comparison per quantized leaf, outside ``jit``). Fails when a
  transform after the quantizer moved the params off the level set, or when
  params and state come from different runs. ``ulps``: the tolerance
  relative to ``|q|`` (the emitted ``q - params`` lands within a few ulps).

  Example:
    >>> import jax.numpy as jnp, optax, blaq_jax
    >>> params = {"kernel": jnp.array([[0.3, -0.1], [0.2, -0.4]])}
    >>> state = blaq_jax.laq(1e-3).init(params)
    >>> blaq_jax.check_on_level_set(params, state)
    Traceback (most recent call last):
    ...
    ValueError: params leaf 'kernel' is off the optimizer's level set by up to 0.15 ...
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  qts = selection.pure_structure(params).flatten_up_to(
      quantized_tensors(opt_state))
  for (path, p), t in zip(flat, qts):
    if not isinstance(t, QuantizedTensor):
      continue
    q = np.asarray(t.dequantize(jnp.float32))
    err = np.abs(np.asarray(p, np.float32) - q)
    if not np.all(err <= ulps * np.finfo(np.float32).eps * np.maximum(
        np.abs(q), 1e-30)):
      raise ValueError(
          f"params leaf '{selection.path_str(path)}' is off the optimizer's "
          f"level set by up to {float(err.max()):.3g} (expected alpha * beta"
          " of the state). Is a transform chained after the quantizer? It "
          "must be the last one; put gradient transforms in its preprocess "
          "argument. Or do params and state come from different runs?")
