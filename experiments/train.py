r"""Training and evaluation of any blaq_jax method on the papers' models.

The command line is :mod:`experiments.main` (``python -m experiments.train``
runs it too)::

  python -m experiments.train --config experiments/configs/quick.py \
      --workdir runs/quick_blaq --config.method=blaq --config.bits=1
  python -m experiments.train eval --workdir runs/quick_blaq
  python -m experiments.train export --workdir runs/quick_blaq

This module holds what a run computes, in the layout of the Flax examples:
the optimizer factory (:func:`make_optimizer`, the only place that knows
methods by name), :func:`train_step`, :func:`eval_step` and
:func:`train_and_evaluate`. Checkpoints and the workdir guard are in
:mod:`experiments.checkpointing`, data and sharding in
:mod:`experiments.input_pipeline`, logs and plots in :mod:`experiments.metrics`.

**Training step.** One jitted function of ``(state, batch)``: the model is
rebuilt from its graph and pure states (``nnx.merge``), the gradient is taken
at the current params (which lie on the level set: a quantized method starts
from ``blaq_jax.quantized_params`` of the init), and the method's update is
called with two extra keyword arguments every method may use,

* ``grad_fn(p)``: the gradient at params ``p`` on the *same* minibatch, with
  the batch-norm running statistics of that evaluation discarded (BLAQ's
  trial gradient :math:`g^* = \nabla \ell(q^*)`),
* ``loss_fn(p)``: the scalar loss at ``p`` on that minibatch (FOGZO, n-SPSA),

so that only what a method uses gets computed. The step knows no method: what
a step cost is read from the method's state (:func:`blaq_jax.step_cost`:
gradient evaluations, 2 on BLAQ's active steps; extra loss evaluations,
``2 n`` on FOGZO's), summed into ``grad_evals`` and ``loss_evals``.

**Phases.** A method whose update switches on a schedule known on the host
(BLAQ's two-stage update, one epoch in ``m = config.blaq_period_epochs``) is
compiled once per phase (:func:`optimizer_phases`) instead of once with a
``lax.cond``: XLA:CPU compiles convolutions inside a conditional's branch to
a slow path (the trial gradient of LeNet5 ran 9x slower than outside one).
The phases have the same optimizer state as the method's own transform.

**Data parallelism.** The step is jitted over a ``jax.sharding.Mesh`` of all
devices (axis ``"data"``; ``config.num_devices`` to use fewer on one host):
the batch is sharded along ``"data"``, params and optimizer state are
replicated, and XLA inserts the gradient and batch-norm reductions. Under
``jax.distributed`` (one process per host) each process loads its shard of
every batch and only process 0 writes metrics, plots and the progress bar.

**Outputs** under ``--workdir``: ``config.json``; ``checkpoints/`` (orbax,
every epoch, with SHA-256 records); ``metrics/steps.jsonl`` and
``metrics/epochs.jsonl``; ``zigzag/epoch_XXXX.npz`` (trace of tracked latent
and quantized weights); ``plots/*.png``; ``summary.json``; ``tensorboard/``
if a TensorBoard writer is installed.

**Resuming and extending.** Running again with the same ``--workdir``
restores the newest good checkpoint (params, batch statistics, optimizer
state, step, epoch, counters; see :mod:`experiments.checkpointing`), says
``resuming from epoch k of n`` and continues; the result is the same as an
uninterrupted run. ``num_epochs`` may be raised on resume when nothing in the
run depends on its length: the learning rate decays per epoch, BLAQ's
schedule is one epoch in ``m`` and epoch ``e``'s shuffle is seeded by
``(seed, e)``. Methods whose schedule spans the whole run
(:data:`LENGTH_DEPENDENT_METHODS`: FOGZO's ``beta`` decays over all steps)
are refused, as is a ``num_epochs`` below the epochs already done.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time
from typing import Any, Callable, Dict, Hashable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import blaq_jax
from blaq_jax import methods
from experiments import checkpointing
from experiments import data as data_lib
from experiments import input_pipeline
from experiments import losses as losses_lib
from experiments import metrics as metrics_lib
from experiments import models as models_lib
from experiments import zigzag
from experiments.checkpointing import ConfigMismatchError

METHODS = tuple(sorted(methods.METHODS))
# Methods with a schedule over the run's total steps: num_epochs is part of
# their identity and cannot change on resume.
LENGTH_DEPENDENT_METHODS = ("fogzo",)


class ConfigError(ValueError):
  """A config value that cannot be meant; the message names the flag."""


# ---------------------------------------------------------------- config --

def _in(lo, hi, lo_open=False):
  def ok(v):
    return (v > lo if lo_open else v >= lo) and v <= hi
  return ok


# (field, test, what the field must be). Checked before anything is written.
CONSTRAINTS: Tuple[Tuple[str, Callable[[Any], bool], str], ...] = (
    ("learning_rate", lambda v: v > 0, "must be > 0"),
    ("lr_decay_rate", _in(0, 1, lo_open=True), "must be in (0, 1]"),
    ("lr_decay_every_epochs", lambda v: v >= 1, "must be >= 1"),
    ("num_epochs", lambda v: v >= 1, "must be >= 1"),
    ("batch_size", lambda v: v >= 1, "must be >= 1"),
    ("eval_batch_size", lambda v: v >= 1, "must be >= 1"),
    ("bits", lambda v: v >= 1, "must be >= 1"),
    ("edge_bits", lambda v: v >= 1, "must be >= 1"),
    ("a", _in(0, 1), "(BLAQ's blend weight) must be in [0, 1]"),
    ("blaq_period_epochs", lambda v: v >= 1, "must be >= 1"),
    ("blaq_epoch_offset", lambda v: v >= 0, "must be >= 0"),
    ("clip_latent", lambda v: v >= 0, "must be >= 0 (0: no clipping)"),
    ("train_size", lambda v: v >= 0, "must be >= 0 (0: the whole split)"),
    ("validation_size", lambda v: v >= 0,
     "must be >= 0 (0: the whole split)"),
    ("test_size", lambda v: v >= 0, "must be >= 0 (0: the whole split)"),
    ("num_devices", lambda v: v >= 0, "must be >= 0 (0: all devices)"),
    ("log_every_steps", lambda v: v >= 1, "must be >= 1"),
    ("stop_after_epochs", lambda v: v >= 0, "must be >= 0 (0: no stop)"),
    ("keep_checkpoints", lambda v: v >= 1, "must be >= 1"),
    ("num_tracked", lambda v: v >= 0, "must be >= 0"),
    ("fogzo.n", lambda v: v >= 1, "must be >= 1"),
    ("fogzo.beta_min", _in(0, 1), "must be in [0, 1]"),
    ("fogzo.eps_scale", lambda v: v > 0, "must be > 0"),
)


def _field(config, dotted: str):
  value = config
  for key in dotted.split("."):
    value = value[key]
  return value


def validate_config(config) -> None:
  """Raises :class:`ConfigError` naming the first value that cannot be meant.

  Example:
    >>> from experiments.configs import quick
    >>> config = quick.get_config()
    >>> config.learning_rate = -0.1
    >>> validate_config(config)
    Traceback (most recent call last):
    ...
    experiments.train.ConfigError: --config.learning_rate=-0.1 must be > 0.
  """
  if config.method not in methods.METHODS:
    raise ConfigError(f"--config.method={config.method!r} is not a method; "
                      f"choose one of {list(METHODS)}.")
  if config.loss not in losses_lib.LOSSES:
    raise ConfigError(f"--config.loss={config.loss!r} is not a loss; choose "
                      f"one of {sorted(losses_lib.LOSSES)}.")
  for field, ok, requirement in CONSTRAINTS:
    value = _field(config, field)
    try:
      good = bool(ok(value)) and not isinstance(value, str)
    except TypeError:
      good = False
    if not good:
      raise ConfigError(f"--config.{field}={value!r} {requirement}.")


# --------------------------------------------------------------- method --

def learning_rate_schedule(config, steps_per_epoch: int):
  """``lr * decay_rate ** (epoch // decay_every_epochs)`` on the step."""
  if config.lr_decay_every_epochs < 1:
    raise ConfigError("--config.lr_decay_every_epochs must be >= 1, got "
                      f"{config.lr_decay_every_epochs}.")
  return optax.exponential_decay(
      config.learning_rate,
      transition_steps=config.lr_decay_every_epochs * steps_per_epoch,
      decay_rate=config.lr_decay_rate, staircase=True)


def quantize_rule(config):
  return models_lib.quantize_rule(config.model, config.bits,
                                  edge_bits=config.edge_bits)


def blaq_schedule(config, steps_per_epoch: int):
  """BLAQ's ``active`` schedule: one epoch in ``config.blaq_period_epochs``,
  shifted by ``config.blaq_epoch_offset`` epochs."""
  return blaq_jax.one_epoch_every(config.blaq_period_epochs, steps_per_epoch,
                                  config.get("blaq_epoch_offset", 0))


def make_optimizer(config, steps_per_epoch: int, total_steps: int, *,
                   blaq_active=None):
  """The method ``config.method`` with the config's hyper-parameters.

  Every quantizing method is built with ``diagnostics=config.diagnostics``
  (True by default: the run logs ``flip_fraction`` and ``update_cosine``;
  they cost a few passes over the weights per step, see
  ``experiments/bench/README.md``). ``blaq_active`` replaces BLAQ's
  schedule (:func:`blaq_schedule`), e.g. ``1`` (every step) or
  :func:`blaq_jax.never`.
  """
  name = config.method
  if name not in methods.METHODS:
    raise ConfigError(f"--config.method={name!r} is not a method; choose "
                      f"one of {list(METHODS)}.")
  lr = learning_rate_schedule(config, steps_per_epoch)
  if name == "fp":
    return methods.create(name, lr)
  kw: Dict[str, Any] = dict(quantize=quantize_rule(config),
                            diagnostics=bool(config.get("diagnostics", True)))
  if config.per_channel:
    kw["channel_axis"] = -1
  if config.clip_latent:
    kw["clip_latent"] = config.clip_latent
  if name in ("bc", "bwn") and config.bits != 1:
    raise ConfigError(f"method {name!r} is binary: set --config.bits=1 (got "
                      f"{config.bits}).")
  if name == "twn" and config.bits != 2:
    raise ConfigError("method 'twn' is ternary (2 bits): set "
                      f"--config.bits=2 (got {config.bits}).")
  if name in ("bc", "bwn", "twn"):
    if name == "bc" and "channel_axis" in kw:
      raise ConfigError("method 'bc' has no scale: set "
                        "--config.per_channel=False.")
    return methods.create(name, lr, **kw)
  if config.level_set:
    kw["level_set"] = config.level_set
  if name in ("laq", "blaq"):
    kw["bits"] = config.bits
    if name == "blaq":
      kw.update(a=config.a, moments=config.moments, blend=config.blend,
                active=(blaq_schedule(config, steps_per_epoch)
                        if blaq_active is None else blaq_active))
    return methods.create(name, lr, **kw)
  # ste, fogzo, n_spsa
  if config.bits == 1:
    kw["quantizer"] = "sign"
  else:
    kw.update(quantizer="uniform", bits=config.bits)
  if name in ("fogzo", "n_spsa"):
    kw.update(n=config.fogzo.n, eps_scale=config.fogzo.eps_scale,
              seed=config.seed)
    if name == "fogzo":
      kw.update(beta_min=config.fogzo.beta_min, beta_decay_steps=total_steps)
  return methods.create(name, lr, **kw)


def optimizer_phases(config, steps_per_epoch: int, total_steps: int):
  """``(phase_of_step, make_phase)`` of a method with host-known phases.

  ``phase_of_step(step)`` is the phase of the step after ``step`` steps and
  ``make_phase(phase)`` the transform that runs it; ``(None, None)`` for a
  method without phases. BLAQ's phases are its two-stage update (``True``)
  and LAQ's update (``False``), by :func:`blaq_schedule`.
  """
  if config.method != "blaq":
    return None, None
  schedule = blaq_schedule(config, steps_per_epoch)

  def make_phase(phase: bool):
    return make_optimizer(config, steps_per_epoch, total_steps,
                          blaq_active=1 if phase else blaq_jax.never)
  return (lambda step: bool(schedule(step))), make_phase


def run_length_is_identity(config) -> bool:
  """Whether the method's schedule spans the run (then ``num_epochs`` is
  part of the run's identity: a run cannot be extended)."""
  return config.method in LENGTH_DEPENDENT_METHODS


# ------------------------------------------------------------- the step --

def model_outputs(graphdef, params, rest, images):
  """The model's outputs and its updated non-param state (batch stats)."""
  model = nnx.merge(graphdef, nnx.State(params), nnx.State(rest))
  out = model(images)
  new_rest = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
  return out, new_rest


def train_step(state, batch, *, graphdef, tx, loss, tracked=()):
  """One step of any method: ``(state, batch) -> (state, metrics)``.

  Args:
    state: ``{"params", "batch_stats", "opt_state"}`` (pure dicts).
    batch: ``{"image", "label"}``.
    graphdef: the model's graph in training mode.
    tx: the method (``update`` takes ``grad_fn`` and ``loss_fn``).
    loss: ``loss(outputs, labels)``, a scalar.
    tracked: ``(leaf, index)`` pairs of the zig-zag trace.

  Returns:
    The new state and the step's metrics: ``loss``, ``accuracy``, the
    method's cost (``grad_evals``, ``loss_evals``, from
    :func:`blaq_jax.step_cost`), the steps it skipped so far for a
    non-finite gradient (``skipped_steps``, 0 for a state without the
    count), its diagnostics and the tracked weights.
  """
  params, rest = state["params"], state["batch_stats"]
  images, labels = batch["image"], batch["label"]

  def forward(p, r):
    out, new_r = model_outputs(graphdef, p, r, images)
    return loss(out, labels), (out, new_r)

  (value, (out, new_rest)), grads = jax.value_and_grad(
      forward, has_aux=True)(params, rest)
  # Evaluations at other params: same batch, statistics discarded.
  grad_fn = jax.grad(lambda p: forward(p, rest)[0])
  loss_fn = lambda p: forward(p, rest)[0]  # noqa: E731
  updates, opt_state = tx.update(grads, state["opt_state"], params,
                                 grad_fn=grad_fn, loss_fn=loss_fn)
  new_params = optax.apply_updates(params, updates)
  cost = blaq_jax.step_cost(opt_state)
  skipped = optax.tree.get(opt_state, "skipped_steps", default=None)
  metrics = dict(
      loss=value,
      accuracy=losses_lib.accuracy(out, labels),
      grad_evals=jnp.asarray(cost.gradient_evaluations, jnp.int32),
      loss_evals=jnp.asarray(cost.loss_evaluations, jnp.int32),
      skipped_steps=jnp.asarray(0 if skipped is None else skipped, jnp.int32),
      tracked_latent=zigzag.gather_tracked(
          zigzag.latent_or_params(new_params, opt_state), tracked),
      tracked_quantized=zigzag.gather_tracked(new_params, tracked),
      tracked_code=zigzag.gather_tracked(
          zigzag.codes_or_signs(new_params, opt_state), tracked),
      **zigzag.step_diagnostics(opt_state))
  new_state = {"params": new_params, "batch_stats": new_rest,
               "opt_state": opt_state}
  return new_state, metrics


def eval_step(state, batch, *, graphdef, loss):
  """Summed loss, correct predictions and count of a masked batch."""
  out, _ = model_outputs(graphdef, state["params"], state["batch_stats"],
                         batch["image"])
  labels, mask = batch["label"], batch["mask"]
  per_example = jax.vmap(lambda o, l: loss(o[None], l[None]))(out, labels)
  correct = (jnp.argmax(out, -1) == labels).astype(jnp.float32)
  return dict(loss=jnp.sum(per_example * mask),
              correct=jnp.sum(correct * mask), count=jnp.sum(mask))


def _quantized_mask(params, opt_state):
  """Per params leaf, whether the method quantizes it (none for ``fp``)."""
  try:
    qts = blaq_jax.quantized_tensors(opt_state)
  except ValueError:  # a state without quantized tensors (plain Optax)
    return [False] * len(jax.tree.leaves(params))
  return [not isinstance(q, optax.MaskedNode)
          for q in jax.tree.structure(params).flatten_up_to(qts)]


# ------------------------------------------------------------ the setup --

class Setup:
  """Everything a run builds from its config before the first step: mesh,
  splits, model graph, method, initial state and the jitted steps."""

  def __init__(self, config, workdir: Optional[str] = None):
    self.config = config
    self.workdir = workdir
    try:
      self.mesh = input_pipeline.make_mesh(config)
    except ValueError as e:  # batch or device count: the config's fault
      raise ConfigError(str(e)) from e
    self.replicated = NamedSharding(self.mesh, P())
    self.splits, self.info = input_pipeline.load_data(config)
    if config.loss not in losses_lib.LOSSES:
      raise ConfigError(f"--config.loss={config.loss!r} is not a loss; "
                        f"choose one of {sorted(losses_lib.LOSSES)}.")
    self.loss = losses_lib.LOSSES[config.loss]
    self.local_batch = config.batch_size // jax.process_count()
    x, y = self.splits["train"]
    self.loader_kw = dict(
        batch_size=self.local_batch, seed=config.seed,
        augment=input_pipeline.augmentation(config, self.info))
    probe = data_lib.make_loader(x, y, **self.loader_kw)
    self.steps_per_epoch = probe.batches_per_epoch
    self.total_steps = self.steps_per_epoch * config.num_epochs
    self.tx = make_optimizer(config, self.steps_per_epoch, self.total_steps)
    self._phase_of_step, self._make_phase = optimizer_phases(
        config, self.steps_per_epoch, self.total_steps)
    self._compiled = {}
    self._build_model()

  def _build_model(self):
    config = self.config
    options = config.model_options.to_dict() if hasattr(
        config.model_options, "to_dict") else dict(config.model_options)
    if config.model in ("lenet5", "vgg_small", "svhn_net"):
      options.setdefault("image_shape", tuple(self.info.image_shape))
    if config.model == "resnet18":
      options.setdefault("in_channels", self.info.image_shape[-1])
      if self.info.image_shape[0] <= 64:
        options.setdefault("stem", "cifar")
    model = models_lib.create_model(
        config.model, num_classes=self.info.num_classes,
        rngs=nnx.Rngs(config.seed), **options)
    model.train()
    self.train_def, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    self.eval_def = nnx.split(model, nnx.Param, ...)[0]
    params = nnx.to_pure_dict(params)
    rest = nnx.to_pure_dict(rest)
    opt_state = self.tx.init(params)
    quantized = _quantized_mask(params, opt_state)
    if any(quantized):  # start on the level set
      params = blaq_jax.quantized_params(params, opt_state)
    self.init_state = {"params": params, "batch_stats": rest,
                       "opt_state": opt_state}
    self.tracked = zigzag.choose_tracked(params, [int(q) for q in quantized],
                                         config.num_tracked, config.seed)

  model_outputs = staticmethod(model_outputs)

  def step_phase(self, step: int) -> Optional[Hashable]:
    """The method's phase at ``step`` (None: a method without phases)."""
    if self._phase_of_step is None:
      return None
    return self._phase_of_step(step)

  def compiled_step(self, phase: Optional[Hashable] = None):
    """The jitted train step of a phase (``None``: the method's own)."""
    if phase not in self._compiled:
      tx = self.tx if phase is None else self._make_phase(phase)
      self._compiled[phase] = jax.jit(
          functools.partial(self.train_step, tx=tx), donate_argnums=(0,),
          out_shardings=(self.replicated, self.replicated))
    return self._compiled[phase]

  def jit_train_step(self, state, batch, step: Optional[int] = None):
    """One training step; ``step`` (the count of steps done) picks the
    phase, read from the state's ``count`` when not given."""
    if self._phase_of_step is not None and step is None:
      step = int(jax.device_get(optax.tree.get(state["opt_state"], "count")))
    return self.compiled_step(self.step_phase(step))(state, batch)

  def train_step(self, state, batch, tx=None):
    return train_step(state, batch, graphdef=self.train_def,
                      tx=self.tx if tx is None else tx, loss=self.loss,
                      tracked=self.tracked)

  def eval_step(self, state, batch):
    return eval_step(state, batch, graphdef=self.eval_def, loss=self.loss)

  @functools.cached_property
  def jit_eval_step(self):
    return jax.jit(self.eval_step, out_shardings=self.replicated)

  def place(self, state):
    """The state replicated over the mesh, every leaf in a buffer of its own
    (the train step donates the state; an init may share one array between
    two leaves)."""
    return jax.device_put(state, self.replicated, may_alias=False)

  def evaluate(self, state, split: str) -> Dict[str, float]:
    """Loss and accuracy on a whole split (padded last batch masked)."""
    x, y = self.splits[split]
    n_dev = self.mesh.devices.size
    size = -(-self.config.eval_batch_size // n_dev) * n_dev
    totals = dict(loss=0.0, correct=0.0, count=0.0)
    for local in input_pipeline.eval_batches(x, y, size, jax.process_index(),
                                             jax.process_count()):
      out = jax.device_get(self.jit_eval_step(
          state, input_pipeline.global_batch(self.mesh, local)))
      for k in totals:
        totals[k] += float(out[k])
    return {f"{split}_loss": totals["loss"] / totals["count"],
            f"{split}_accuracy": totals["correct"] / totals["count"]}

  def evaluate_all(self, state) -> Dict[str, float]:
    out = {}
    for split in ("validation", "test"):
      if split in self.splits and len(self.splits[split][1]):
        out.update(self.evaluate(state, split))
    return out


# --------------------------------------------------------------- train --

def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming it), returns the summary.

  Args:
    config: the run's configuration (see ``experiments/configs/``).
    workdir: where checkpoints, metrics and plots go; resumed if it holds a
      run of the same configuration.

  Returns:
    The summary (also written to ``workdir/summary.json``): final and best
    accuracies, epochs and steps done, gradient evaluations, wall time,
    zig-zag statistics of the second half of the run.

  Raises:
    ConfigError: a config value that cannot be meant (nothing is written).
    ConfigMismatchError: ``workdir`` holds a run with another config.
    checkpointing.CheckpointError: every checkpoint of ``workdir`` is
      damaged.
  """
  is_main = jax.process_index() == 0
  validate_config(config)
  checkpointing.check_workdir_config(
      workdir, config, fixed_length=run_length_is_identity(config))
  setup = Setup(config, workdir)
  os.makedirs(workdir, exist_ok=True)

  ckpt = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"),
                                   config.keep_checkpoints)
  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.tensorboard,
                                    enabled=is_main)
  state = setup.place(setup.init_state)
  meta = dict(epoch=0, step=0, grad_evals=0, loss_evals=0, wall_time=0.0)
  restored = ckpt.restore_latest(state, setup.replicated, move_damaged=True)
  if restored is not None:
    _, state, saved = restored
    meta.update({k: saved[k] for k in meta})
    if meta["epoch"] > config.num_epochs:
      ckpt.close()
      raise ConfigMismatchError(
          f"--workdir {workdir} holds {meta['epoch']} epochs; "
          f"num_epochs={config.num_epochs} would shorten the run. Use "
          f"--config.num_epochs >= {meta['epoch']} or a new --workdir.")
    if is_main:
      print(f"resuming from epoch {meta['epoch']} of {config.num_epochs} "
            f"({ckpt.step_dir(meta['epoch'])})", flush=True)
  if is_main:
    checkpointing.write_config(workdir, config)
    metrics_lib.truncate_traces(workdir, meta["epoch"])
  writer.truncate(meta["step"], meta["epoch"])

  x, y = setup.splits["train"]
  batches = iter(data_lib.make_loader(
      x, y, num_epochs=config.num_epochs,
      start_index=meta["epoch"] * setup.steps_per_epoch, **setup.loader_kw))
  last = config.num_epochs
  if config.stop_after_epochs:
    last = min(last, config.stop_after_epochs)
  lr_fn = learning_rate_schedule(config, setup.steps_per_epoch)
  log_every = config.log_every_steps

  for epoch in range(meta["epoch"], last):
    t0 = time.perf_counter()
    bar = metrics_lib.progress_bar(setup.steps_per_epoch,
                                   f"epoch {epoch + 1}/{last}",
                                   config.progress_bar and is_main)
    per_step = []
    for i in range(setup.steps_per_epoch):
      batch = input_pipeline.global_batch(setup.mesh, next(batches))
      state, metrics = setup.jit_train_step(state, batch,
                                            step=meta["step"] + i)
      per_step.append(metrics)
      if bar is not None and (i + 1) % log_every == 0:
        m = jax.device_get({k: metrics[k] for k in ("loss", "accuracy")})
        bar.set_postfix(loss=f"{float(m['loss']):.4f}",
                        acc=f"{float(m['accuracy']):.3f}")
        bar.update(log_every)
    per_step = jax.device_get(per_step)
    train_time = time.perf_counter() - t0
    if bar is not None:
      bar.update(setup.steps_per_epoch - bar.n)
      bar.close()

    step0 = meta["step"]
    steps_log = metrics_lib.step_records(per_step, first_step=step0,
                                         epoch=epoch + 1, lr_fn=lr_fn,
                                         log_every=log_every)
    meta["step"] = step0 + len(per_step)
    meta["grad_evals"] += int(sum(int(m["grad_evals"]) for m in per_step))
    meta["loss_evals"] += int(sum(int(m["loss_evals"]) for m in per_step))
    evals = setup.evaluate_all(state)
    epoch_time = time.perf_counter() - t0
    meta["wall_time"] += epoch_time
    meta["epoch"] = epoch + 1
    record = dict(
        epoch=epoch + 1, step=meta["step"],
        lr=float(lr_fn(meta["step"] - 1)),
        **metrics_lib.epoch_means(per_step),
        grad_evals=meta["grad_evals"], loss_evals=meta["loss_evals"],
        skipped_steps=int(per_step[-1]["skipped_steps"]), **evals, epoch_time=epoch_time, wall_time=meta["wall_time"],
        steps_per_second=len(per_step) / train_time)
    writer.write("steps", steps_log, "step")
    writer.write("epochs", [record], "epoch")
    if is_main:
      metrics_lib.write_trace(workdir, epoch + 1, step0, per_step,
                              setup.tracked)
      print(metrics_lib.epoch_line(record), flush=True)
    ckpt.save(epoch + 1, state, meta)
  ckpt.close()

  summary = metrics_lib.summarize(workdir, config)
  if is_main:
    (pathlib.Path(workdir) / "summary.json").write_text(
        json.dumps(summary, indent=2))
    if config.write_plots:
      metrics_lib.write_plots(workdir)
  return summary


# ------------------------------------------------------- eval / export --

def restore_latest(workdir: str, config):
  """``(setup, state, meta)`` of the newest good checkpoint of ``workdir``.

  Damaged newer checkpoints are named on stderr and left in place.
  """
  checkpointing.check_workdir_config(
      workdir, config, fixed_length=run_length_is_identity(config))
  setup = Setup(config, workdir)
  ckpt = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"),
                                   config.keep_checkpoints)
  try:
    restored = ckpt.restore_latest(setup.place(setup.init_state),
                                   setup.replicated)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints.")
  _, state, meta = restored
  return setup, state, meta


def _merge_trees(a: Mapping, b: Mapping) -> Dict:
  out = dict(a)
  for k, v in b.items():
    if k in out and isinstance(out[k], Mapping) and isinstance(v, Mapping):
      out[k] = _merge_trees(out[k], v)
    elif k in out:
      raise ValueError(f"Leaf name {k!r} is both a parameter and a "
                       "statistic.")
    else:
      out[k] = v
  return out


def _split_like(tree: Mapping, like: Mapping) -> Dict:
  return {k: (_split_like(tree[k], v) if isinstance(v, Mapping) else tree[k])
          for k, v in like.items()}


def export_checkpoint(workdir: str, config, path: Optional[str] = None,
                      print_summary: bool = False):
  """Exports the latest good checkpoint with :func:`blaq_jax.export`: the
  params and the batch statistics (the whole model state).

  With ``print_summary`` also prints :func:`blaq_jax.summary`'s per-layer
  size table and the file's size.
  """
  _, state, meta = restore_latest(workdir, config)
  path = path or os.path.join(workdir, "export", "model.safetensors")
  tree = _merge_trees(state["params"], state["batch_stats"])
  opt_state = (state["opt_state"]
               if any(_quantized_mask(state["params"], state["opt_state"]))
               else None)
  if jax.process_index() == 0:
    tree, opt_state = jax.device_get((tree, opt_state))
    blaq_jax.export(path, tree, opt_state,
                    metadata=dict(config=checkpointing.json_config(config),
                                  epoch=meta["epoch"], step=meta["step"]))
    if print_summary:
      blaq_jax.summary(tree, opt_state)
      print(f"{path}: {os.path.getsize(path):,} bytes")
  return path


def evaluate_workdir(workdir: str, config,
                     from_export: Optional[str] = None) -> Dict[str, float]:
  """Test/validation metrics of the latest good checkpoint, or of an export.

  With ``from_export`` the params and batch statistics are those loaded by
  :func:`blaq_jax.load` (the packed low-bit weights), evaluated with the
  model built from ``config``.
  """
  if from_export:
    checkpointing.check_workdir_config(
        workdir, config, fixed_length=run_length_is_identity(config))
    setup = Setup(config, workdir)
    like = _merge_trees(setup.init_state["params"],
                        setup.init_state["batch_stats"])
    loaded = blaq_jax.load(from_export, like)
    state = dict(setup.init_state,
                 params=_split_like(loaded, setup.init_state["params"]),
                 batch_stats=_split_like(loaded,
                                         setup.init_state["batch_stats"]))
    state = setup.place(state)
  else:
    setup, state, _ = restore_latest(workdir, config)
  return setup.evaluate_all(state)


if __name__ == "__main__":
  from experiments import main as cli  # pylint: disable=g-import-not-at-top
  cli.run()
