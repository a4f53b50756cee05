"""The public methods of blaq_jax: each factory and its documentation.

As optax's ``alias.py``: each factory checks its arguments, builds its rule
(:mod:`blaq_jax.loss_aware`, :mod:`blaq_jax.ste`, :mod:`blaq_jax.fogzo`) and
hands it to :func:`blaq_jax.engine.quantized_latent`;
:func:`~blaq_jax.arguments.with_options` adds the engine's options to its
signature. All are importable from the top level (``blaq_jax.laq``, ...).
"""

from __future__ import annotations

import inspect
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blaq_jax import engine
from blaq_jax import fogzo as fogzo_rule
from blaq_jax import loss_aware
from blaq_jax import quantizers
from blaq_jax import ste as ste_rule
from blaq_jax.arguments import (DROP, OPTIONS, Active, ScalarOrSchedule,
                                check_unit_interval, static_int,
                                with_options)
from blaq_jax.levels import KINDS, check_bits
from blaq_jax.schedules import check_active

QUANTIZERS = ("sign", "ternary", "uniform")


def _loss_aware_sets(level_set, bits, b1, b2):
  """Checks the arguments LAQ and BLAQ share; their level sets per leaf."""
  bits = check_bits(bits, level_set if level_set in KINDS else "blaq")
  if level_set not in KINDS:
    raise ValueError(f"Unknown level_set {level_set!r}; expected one of "
                     f"{KINDS}.")
  for name, value in (("b1", b1), ("b2", b2)):
    check_unit_interval(name, value)
  return loss_aware.level_sets(level_set, bits)


@with_options()
def laq(learning_rate: ScalarOrSchedule, *, bits: int = 1,
        level_set: str = "blaq", b1: float = 0.9, b2: float = 0.999,
        eps: float = 1e-8, **options) -> optax.GradientTransformationExtraArgs:
  """Loss-aware weight quantization (LAB / LAQ, Hou et al. 2017, 2018).

  .. math::

    w_{t+1} = w_t - \\eta_t \\frac{\\hat m_t}{\\epsilon + \\sqrt{\\hat v_t}},
    \\qquad q_{t+1} = \\operatorname{proj}_{D_t}(w_{t+1}),
    \\qquad D_t = (\\epsilon + \\sqrt{\\hat v_t}) / \\eta_t .

  The transform receives the gradient at the quantized weights and emits
  ``q_{t+1} - params``. It is :func:`blaq` without the trial stage.

  Args:
    learning_rate: float or Optax schedule ``eta_t``.
    bits: default bit width of quantized leaves (1..8).
    level_set: ``"blaq"`` (the BLAQ paper's set without zero, default),
      ``"linear"`` (with zero; 2 bits = ternary) or ``"log"``; see
      :mod:`blaq_jax.levels`.
    b1, b2, eps: Adam's hyper-parameters (also for full-precision leaves).
    **options: the engine's options (``quantize``, ``channel_axis``,
      ``clip_latent``, ``preprocess``, ``diagnostics``, ``batch_axis_name``,
      ``tol``, ``max_iter``): :func:`blaq_jax.engine.quantized_latent`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``(grads, state, params)`` and optionally ``curvature_fn(params) -> tree``
    to replace Adam's ``D`` by a user-supplied diagonal curvature.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blaq_jax
    >>> params = {"kernel": jnp.array([[0.5, -0.2], [0.1, 0.4]])}
    >>> loss = lambda p: jnp.sum((p["kernel"] - 0.3) ** 2)
    >>> opt = blaq_jax.laq(0.01)
    >>> state = opt.init(params)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> jnp.unique(jnp.abs(params["kernel"])).size  # one scale, two signs
    1
  """
  sets = _loss_aware_sets(level_set, bits, b1, b2)
  return engine.quantized_latent(
      loss_aware.rule(learning_rate, b1=b1, b2=b2, eps=eps, trial=False), sets,
      who="laq", **options)


@with_options()
def blaq(learning_rate: ScalarOrSchedule, *, bits: int = 1,
         a: ScalarOrSchedule = 0.6, active: Active = 1,
         blend: str = "lookahead", level_set: str = "blaq", b1: float = 0.9,
         b2: float = 0.999, eps: float = 1e-8, opaque: bool = True,
         moments: str = "real", keep_trial: bool = False,
         trial_rounds: Optional[int] = None,
         **options) -> optax.GradientTransformationExtraArgs:
  """BLAQ: LAQ with a one-step-forward trial and backtrack (Ma et al. 2024).

  One active step, numbered as Algorithm 1 of the paper's appendix:

  .. math::

    &\\text{13-15: } m_t, v_t \\text{ from } g_t,\\quad
      D_t = (\\epsilon + \\sqrt{\\hat v_t}) / \\eta \\\\
    &\\text{16: } w^* = w_t - \\hat m_t / D_t,\\quad
      q^* = \\operatorname{proj}_{D_t}(w^*) \\\\
    &\\text{17-20: } g^* = \\nabla \\ell(q^*) \\text{ on the same minibatch} \\\\
    &\\text{21: } d = \\text{the blend of the reading (below)} \\\\
    &\\text{22: } m^* = b_1 m_t + (1-b_1) g^*,\\ v^* = b_2 v_t + (1-b_2)
      g^{*2} \\text{ (corrected at } t+1),\\ D^* \\\\
    &\\text{23: } \\bar D = a D_t + (1 - a) D^* \\\\
    &\\text{24: } w_{t+1} = w_t - d / \\bar D,\\quad
      q_{t+1} = \\operatorname{proj}_{\\bar D}(w_{t+1})

  The paper does not say what its ``g_hat`` is; ``blend`` picks the reading
  of line 21 (:ref:`blaq-readings`):

  ===============  ====================================  ==================
  ``blend``        ``d``                                 weight of ``g*``
  ===============  ====================================  ==================
  ``"lookahead"``  ``a m_hat_t + (1-a) g*`` (default)    ``1-a``
  ``"moments"``    ``a m_hat_t + (1-a) m_hat*``          ``(1-a)(1-b1)``
  ``"gradients"``  ``a g_t + (1-a) g*`` (no momentum)    ``1-a``
  ===============  ====================================  ==================

  With ``b1 = 0`` the three coincide. ``"lookahead"`` is the default: it did
  best on real networks (the paired-seed regime map,
  ``experiments/README.md``). With ``a = 1`` (``"moments"``,
  ``"lookahead"``), or on steps where ``active`` is false, the update is
  exactly :func:`laq`'s; a constant ``a = 1`` takes no trial gradient (an
  ``a`` schedule at 1 does, and at 2 bits its scale is one round further
  than LAQ's: next paragraph).
  Theorem 2 of the paper: BLAQ converges faster than LAQ for
  ``2 / (L eta) - 1 < a < 1``. Full-precision leaves take Adam's step.

  Where the projection runs fixed rounds (2 bits by default), an active
  step in the opaque mode with a static ``active`` starts the real
  projection ``q_{t+1}`` from the trial's scale, not the last step's, and
  runs one round fewer (at least one): ``w*`` and ``w_{t+1}`` are both one
  step from ``w_t``. Over an MNIST run this saves one of the four rounds
  and leaves a mean relative excess D-weighted error at ``q_{t+1}`` of
  4.6e-7, max 4.8e-5 (2 rounds from the last scale: 2.5e-7, max 7.1e-5;
  ``experiments/results/one_pass_projection/``). A traced schedule
  (``lax.cond``) and the transparent mode start from the last scale.

  Args:
    learning_rate: float or Optax schedule.
    bits, level_set, b1, b2, eps: as in :func:`laq`.
    a: blend weight of the real step in ``[0, 1]`` (float or schedule of the
      step count). Paper: 0.6 (MNIST, SVHN, CIFAR-10), 0.9 (ImageNet).
    active: when to run the two-stage update: an int period in steps
      (``1`` = every step) or a callable ``step -> bool`` such as
      :func:`blaq_jax.one_epoch_every` (the paper's "one epoch out of every
      m"). On inactive steps no trial gradient is computed.
    blend: the reading of line 21: ``"lookahead"`` (default),
      ``"moments"`` or ``"gradients"`` (table above).
    opaque: ``True``: ``update(grads, state, params, *, grad_fn)`` calls
      ``grad_fn(trial_params) -> grads`` (same minibatch) inside the step.
      ``False`` (transparent): an active step takes two ``update`` calls, the
      first moving the params to ``q*``, the second given the gradient there;
      a loop feeding a new minibatch each call then takes ``g*`` on the next
      minibatch (and BatchNorm statistics at ``q*``): the opaque mode follows
      the paper exactly.
    moments: what the next step inherits: ``"real"`` (default; the moments
      of the real gradient, the trial is a look-ahead only) or ``"blended"``
      (``a m_t + (1-a) m*`` and likewise ``v``).
    keep_trial: also store ``w*`` and ``g*`` of the last active step in the
      state (two full-size buffers per quantized leaf).
    trial_rounds: ``None`` (default): the trial point's projection ``q*``
      runs the real step's rounds (the real projection then continues from
      its scale, above). An int: that many rounds where the
      projection runs fixed rounds (by default at 2 bits; converging ones,
      above 2 bits or with ``tol > 0``, converge at ``q*`` too). ``q*`` only
      locates ``g*``: ``1`` saves one more of the active 2-bit step's
      rounds and leaves a mean relative excess D-weighted error at ``q*`` of
      1.3e-6 (max 1.9e-4; 2 rounds: 4.7e-7, max 7.5e-5) over an MNIST run
      (``experiments/results/projection_error.md``).
    **options: the engine's options (:func:`laq`); ``preprocess`` also
      reaches the trial gradient, and under ``pmap``/``shard_map``
      ``batch_axis_name`` averages the trial gradient like the main one.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blaq_jax
    >>> target = jnp.array([[0.3, -0.2], [0.25, -0.35]])
    >>> loss = lambda p: jnp.sum((p["kernel"] - target) ** 2)
    >>> params = {"kernel": jnp.array([[0.1, 0.1], [-0.1, 0.1]])}
    >>> opt = blaq_jax.blaq(0.05, a=0.6, blend="lookahead")
    >>> state = opt.init(params)
    >>> for _ in range(100):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = opt.update(grads, state, params,
    ...                               grad_fn=jax.grad(loss))
    ...   params = optax.apply_updates(params, updates)
    >>> jnp.sign(params["kernel"]).tolist()
    [[1.0, -1.0], [1.0, -1.0]]
  """
  sets = _loss_aware_sets(level_set, bits, b1, b2)
  check_unit_interval("a", a)
  check_active(active)
  if blend not in loss_aware.BLENDS:
    raise ValueError(f"blend must be one of {loss_aware.BLENDS}, got "
                     f"{blend!r}.")
  if moments not in ("real", "blended"):
    raise ValueError(f"moments must be 'real' or 'blended', got {moments!r}.")
  if trial_rounds is not None and (
      isinstance(trial_rounds, (bool, np.bool_))
      or not isinstance(trial_rounds, (int, np.integer)) or trial_rounds < 1):
    raise ValueError(
        f"trial_rounds must be None or a static int >= 1, got "
        f"{trial_rounds!r} (under optax.inject_hyperparams pass it in "
        "static_args).")
  rule = loss_aware.rule(learning_rate, b1=b1, b2=b2, eps=eps, trial=True, a=a,
               active=active, blend=blend, moments=moments, opaque=opaque,
               keep_trial=keep_trial, trial_rounds=trial_rounds)
  return engine.quantized_latent(rule, sets, who="blaq", **options)



def _straight_through(learning_rate, *, optimizer=None, quantizer="sign",
                      bits=None, level_set="linear", surrogate=None,
                      scale="fit", threshold=0.7, estimator=None, who="ste",
                      **options) -> optax.GradientTransformationExtraArgs:
  """:func:`ste` whose STE gradient an ``estimator`` (:mod:`blaq_jax.fogzo`)
  may replace; ``who`` names the method in error messages."""
  for name, value, known in (("quantizer", quantizer, QUANTIZERS),
                             ("level_set", level_set, KINDS)):
    if value not in known:
      raise ValueError(f"{who}: unknown {name}={value!r}; expected one of "
                       f"{known}.")
  native = {"sign": 1, "ternary": 2}.get(quantizer)
  bits = check_bits((native or 2) if bits is None else bits, "blaq",
                    where="bits")
  if native is not None and bits != native:
    raise ValueError(
        f"{who}: quantizer={quantizer!r} has {native} bit(s), got bits={bits}"
        " (use quantizer='uniform' for other widths, or the quantize rule to "
        "give single leaves other widths).")
  kind = "linear" if quantizer == "ternary" else level_set
  if surrogate is None:
    surrogate = "hardtanh" if quantizer == "sign" else "identity"
  quantizers.check_surrogate(surrogate, where="surrogate")
  scale = quantizers.check_scale(scale, where="scale")
  guarded = optimizer is None
  if optimizer is None:
    if learning_rate is None:
      raise ValueError(f"{who}: give a learning_rate or an optimizer.")
    optimizer = guarded_adam(learning_rate)
  rule = ste_rule.rule(optimizer, surrogate=surrogate, scale=scale,
                       threshold=threshold, estimator=estimator,
                       guarded=guarded)
  return engine.quantized_latent(rule, ste_rule.level_sets(bits, kind),
                                 who=who, **options)


def guarded_adam(learning_rate: ScalarOrSchedule, b1: float = 0.9,
                 b2: float = 0.999, eps: float = 1e-8
                 ) -> optax.GradientTransformationExtraArgs:
  """``optax.adam`` whose ``update`` also takes ``finite``: the state is kept
  when it is False, and the new moments are written once before the step
  reads them. Same state and arithmetic as ``optax.adam``; the default inner
  optimizer of the STE family (the engine then need not select the state
  again, which made XLA copy the donated moments).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> opt = guarded_adam(0.1)
    >>> u, state = opt.update({"w": jnp.array([0.5, jnp.nan])},
    ...                       opt.init(params), params, finite=False)
    >>> int(optax.tree.get(state, "count")), u["w"].tolist()
    (0, [0.0, 0.0])
  """
  base = optax.adam(learning_rate, b1, b2, eps)

  def update(updates, state, params=None, *, finite=True, **extra):
    del params, extra
    adam, schedule = state
    mu = optax.tree.update_moment(updates, adam.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, adam.nu, b2, 2)
    count = optax.safe_increment(adam.count)
    new = (optax.ScaleByAdamState(count, mu, nu), schedule)
    lr = learning_rate
    if callable(learning_rate):
      lr = learning_rate(schedule.count)
      new = (new[0], optax.ScaleByScheduleState(
          optax.safe_increment(schedule.count)))
    new = jax.lax.optimization_barrier(optax.tree.where(finite, new, state))
    mu, nu, count = new[0].mu, new[0].nu, new[0].count
    step = jax.tree.map(
        lambda m, v: -lr * (m / (jnp.sqrt(v) + eps)),
        optax.tree.bias_correction(mu, b1, count),
        optax.tree.bias_correction(nu, b2, count))
    return jax.tree.map(lambda x: jnp.where(finite, x, 0), step), new

  return optax.GradientTransformationExtraArgs(base.init, update)


@with_options()
def ste(learning_rate: Optional[ScalarOrSchedule], *,
        optimizer: Optional[optax.GradientTransformation] = None,
        quantizer: str = "sign", bits: Optional[int] = None,
        level_set: str = "linear", surrogate: Optional[str] = None,
        scale: quantizers.Scale = "fit", threshold: float = 0.7,
        **options) -> optax.GradientTransformationExtraArgs:
  """Straight-through training of quantized weights (:ref:`ste-rule`).

  .. math:: w \\leftarrow w + \\operatorname{opt}(g \\odot S'(w / \\alpha)),
    \\qquad q = \\alpha\\, \\operatorname{nearest}_Q(w / \\alpha)

  Args:
    learning_rate: of the default inner ``optax.adam`` (``None`` if
      ``optimizer`` is given).
    optimizer: inner Optax optimizer of the latent weights and of the
      full-precision leaves.
    quantizer: ``"sign"`` (1 bit), ``"ternary"`` (2 bits) or ``"uniform"``.
    bits: default width of quantized leaves (``"uniform"``: 2); a leaf at
      ``k >= 2`` bits uses ``LevelSet(level_set, k)``, at 1 bit the sign.
    level_set: ``"linear"`` (with zero), ``"blaq"`` (no zero) or ``"log"``.
    surrogate: one of :data:`blaq_jax.quantizers.SURROGATES` (default
      ``"hardtanh"`` for ``"sign"``, else ``"identity"``).
    scale: ``"fit"`` (least squares), ``"twn"``, ``"max"`` or a fixed float.
    threshold: TWN's threshold factor (``scale="twn"``).
    **options: the engine's options, :func:`blaq_jax.engine.quantized_latent`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blaq_jax
    >>> target = jnp.array([[0.7, -0.6], [0.9, 0.05]])
    >>> loss = lambda p: jnp.sum((p["kernel"] - target) ** 2)
    >>> params = {"kernel": jnp.array([[0.1, 0.2], [-0.1, 0.1]])}
    >>> opt = blaq_jax.ste(0.05, quantizer="ternary", scale=0.5)
    >>> state = opt.init(params)
    >>> for _ in range(40):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> params["kernel"].tolist()
    [[0.5, -0.5], [0.5, 0.0]]
  """
  return _straight_through(
      learning_rate, optimizer=optimizer, quantizer=quantizer, bits=bits,
      level_set=level_set, surrogate=surrogate, scale=scale,
      threshold=threshold, who="ste", **options)



# ste's own arguments with their defaults, which fogzo and n_spsa take too.
STE_OPTIONS = {k: p.default for k, p in inspect.signature(ste).parameters
               .items() if p.kind is p.KEYWORD_ONLY and k not in OPTIONS}


@with_options(clip_latent=1.0, channel_axis=DROP)
def binary_connect(learning_rate: Optional[ScalarOrSchedule], *,
                   optimizer: Optional[optax.GradientTransformation] = None,
                   **options) -> optax.GradientTransformationExtraArgs:
  """BinaryConnect (Courbariaux et al. 2015): ``q = sign(w)``.

  Scale 1, the hardtanh STE ``g 1[|w| <= 1]``, latent weights clipped to
  ``[-1, 1]``; leaves given ``k >= 2`` bits use the ``"linear"`` grid.

  Args:
    learning_rate, optimizer: as in :func:`ste`.
    **options: the engine's options; no ``channel_axis``, ``clip_latent=1``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, blaq_jax
    >>> params = {"kernel": jnp.array([[0.3, -0.2]])}
    >>> opt = blaq_jax.binary_connect(0.1)
    >>> updates, _ = opt.update({"kernel": jnp.array([[1.0, 1.0]])},
    ...                         opt.init(params), params)
    >>> optax.apply_updates(params, updates)["kernel"].tolist()
    [[1.0, -1.0]]
  """
  return _straight_through(
      learning_rate, optimizer=optimizer, quantizer="sign",
      surrogate="hardtanh", scale=1.0, who="binary_connect", **options)


@with_options()
def bwn(learning_rate: Optional[ScalarOrSchedule], *,
        optimizer: Optional[optax.GradientTransformation] = None,
        surrogate: str = "identity",
        **options) -> optax.GradientTransformationExtraArgs:
  """Binary-weight networks (XNOR-Net's BWN, Rastegari et al. 2016).

  .. math:: q = \\alpha\\, \\operatorname{sign}(w),\\qquad
    \\alpha = \\tfrac{1}{n} \\textstyle\\sum_i |w_i|

  per tensor, or per slice of ``channel_axis``.

  Args:
    learning_rate, optimizer, surrogate: as in :func:`ste` (default
      identity surrogate).
    **options: the engine's options, :func:`blaq_jax.engine.quantized_latent`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, blaq_jax
    >>> params = {"kernel": jnp.array([[0.3, -0.1], [0.2, -0.4]])}
    >>> state = blaq_jax.bwn(1e-3).init(params)
    >>> blaq_jax.quantized_params(params, state)["kernel"].tolist()
    [[0.25, -0.25], [0.25, -0.25]]
  """
  return _straight_through(
      learning_rate, optimizer=optimizer, quantizer="sign",
      surrogate=surrogate, scale="fit", who="bwn", **options)


@with_options()
def twn(learning_rate: Optional[ScalarOrSchedule], *,
        optimizer: Optional[optax.GradientTransformation] = None,
        threshold: float = 0.7, surrogate: str = "identity",
        **options) -> optax.GradientTransformationExtraArgs:
  """Ternary weight networks (Li et al. 2016).

  .. math:: \\Delta = t\\, \\tfrac{1}{n} \\textstyle\\sum_i |w_i|,\\quad
    I = \\{i : |w_i| > \\Delta\\},\\quad
    \\alpha = \\tfrac{1}{|I|} \\textstyle\\sum_{i \\in I} |w_i|,\\quad
    q_i = \\alpha \\operatorname{sign}(w_i) 1[i \\in I]

  Leaves given another width by ``quantize`` use the least-squares scale.

  Args:
    learning_rate, optimizer, surrogate: as in :func:`ste` (default
      identity surrogate).
    threshold: ``t``.
    **options: the engine's options; ``channel_axis`` gives each slice its
      own ``Delta, alpha``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, blaq_jax
    >>> params = {"kernel": jnp.array([[0.75, -0.0625], [0.125, -0.5]])}
    >>> state = blaq_jax.twn(1e-3).init(params)
    >>> # delta = 0.7 * 0.359375, alpha = (0.75 + 0.5) / 2
    >>> blaq_jax.quantized_params(params, state)["kernel"].tolist()
    [[0.625, 0.0], [0.0, -0.625]]
  """
  return _straight_through(
      learning_rate, optimizer=optimizer, quantizer="ternary",
      surrogate=surrogate, scale="twn", threshold=threshold, who="twn",
      **options)



def _zeroth_order(learning_rate, *, beta, beta_min, beta_decay_steps, n,
                  eps_scale, norm, active, seed, directions_batch, who,
                  **ste_options):
  """The STE transform whose estimator is FOGZO (n-SPSA: ``beta = 0``)."""
  n, directions_batch = fogzo_rule.check_estimate_args(n, directions_batch, norm, beta)
  check_unit_interval("beta_min", beta_min)
  if not isinstance(beta_decay_steps, (jax.Array, jax.core.Tracer)):
    static_int("beta_decay_steps", beta_decay_steps, 0)
  if not isinstance(eps_scale, jax.core.Tracer) and not (
      np.ndim(eps_scale) == 0 and float(eps_scale) > 0):
    raise ValueError(f"eps_scale must be a positive scalar, got "
                     f"{eps_scale!r}.")
  check_active(active)
  if isinstance(seed, (bool, np.bool_)) or not isinstance(
      seed, (int, np.integer, jax.Array)):
    raise TypeError(f"seed must be an int, got {seed!r}.")

  estimator = fogzo_rule.estimator(
      beta=beta, beta_min=beta_min, beta_decay_steps=beta_decay_steps, n=n,
      eps_scale=eps_scale, norm=norm, active=active, seed=seed,
      directions_batch=directions_batch,
      axis_name=ste_options.get("batch_axis_name"))
  return _straight_through(learning_rate, who=who, **ste_options,
                           estimator=estimator)


@with_options(**STE_OPTIONS)
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


@with_options(**STE_OPTIONS)
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
