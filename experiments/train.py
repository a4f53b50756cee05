r"""Training application: any blaq_jax method on the papers' models and data.

Usage (Flax-examples style; every config field can be overridden)::

  python -m experiments.train --config experiments/configs/quick.py \
      --workdir runs/quick_blaq --config.method=blaq --config.bits=1
  python -m experiments.train eval --workdir runs/quick_blaq
  python -m experiments.train export --workdir runs/quick_blaq
  python -m experiments.train eval --workdir runs/quick_blaq \
      --from_export runs/quick_blaq/export/model.safetensors

Methods (``--config.method``): ``fp`` (full-precision Adam), ``bc``, ``bwn``,
``twn``, ``ste``, ``laq``, ``blaq``, ``fogzo``, ``n_spsa``
(:mod:`blaq_jax.methods`).

**Training step.** One jitted function of ``(state, batch)``: the model is
rebuilt from its graph and pure states (``nnx.merge``), the gradient is taken
at the current params (which lie on the level set: a quantized method starts
from ``blaq_jax.quantized_params`` of the init), and the method's update is
called with two extra keyword arguments every method may use,

* ``grad_fn(p)``: the gradient at params ``p`` on the *same* minibatch, with
  the batch-norm running statistics of that evaluation discarded (BLAQ's
  trial gradient :math:`g^* = \nabla \ell(q^*)`),
* ``loss_fn(p)``: the scalar loss at ``p`` on that minibatch (FOGZO, n-SPSA),

so that only what a method uses gets computed. BLAQ's two-stage update runs
one epoch in ``m = config.blaq_period_epochs``
(:func:`blaq_jax.one_epoch_every`). Gradient evaluations are counted
(``grad_evals``: 1 per step, 2 on BLAQ's active steps; ``loss_evals``: the
``2 n`` extra forward passes of FOGZO/n-SPSA steps).

**Data parallelism.** The step is jitted over a ``jax.sharding.Mesh`` of all
devices (axis ``"data"``; ``config.num_devices`` to use fewer on one host):
the batch is sharded along ``"data"``, params and optimizer state are
replicated, and XLA inserts the gradient and batch-norm reductions. Under
``jax.distributed`` (one process per host) each process loads its shard of
every batch (grain, by process index) and the global batch is assembled with
``jax.make_array_from_process_local_data``; orbax writes and restores the
checkpoints across hosts; only process 0 writes metrics, plots and shows the
progress bar.

**Outputs** under ``--workdir``: ``config.json``; ``checkpoints/`` (orbax,
every epoch); ``metrics/steps.jsonl`` (every ``log_every_steps``) and
``metrics/epochs.jsonl``; ``zigzag/epoch_XXXX.npz`` (trace of tracked latent
and quantized weights); ``plots/*.png`` (training loss, test accuracy,
zig-zag); ``summary.json``; ``tensorboard/`` if a TensorBoard writer
(``tensorboardX`` or TensorFlow) is installed.

**Resuming.** Running again with the same ``--workdir`` restores the latest
checkpoint (params, batch statistics, optimizer state, step, epoch, data
position, counters) and continues; the result is the same as an
uninterrupted run. A workdir written with another configuration is refused
(the error names the differing fields) and left untouched; only the fields of
:data:`RUN_CONTROL_FIELDS` may differ.

**Extending.** ``num_epochs`` may also be raised on resume (e.g. a 10-epoch
run continued to 50) when nothing in the run depends on its length: the
learning rate decays per epoch, BLAQ's schedule is one epoch in ``m`` and
epoch ``e``'s shuffle is seeded by ``(seed, e)``, so the first 10 epochs of
a 50-epoch run are the 10-epoch run, and the extended run equals the
uninterrupted 50-epoch one. Methods whose schedule spans the whole run
(:data:`LENGTH_DEPENDENT_METHODS`: FOGZO's ``beta`` decays over all steps)
are refused, as is a ``num_epochs`` below the epochs already done.
``config.json`` then records the new length.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import blaq_jax
from blaq_jax import methods
from experiments import data as data_lib
from experiments import losses as losses_lib
from experiments import models as models_lib
from experiments import plots
from experiments import zigzag

# Config fields that control logging and stopping only: a workdir written
# with other values of these is resumed.
RUN_CONTROL_FIELDS = ("data_dir", "num_devices", "eval_batch_size",
                      "log_every_steps", "progress_bar", "write_plots",
                      "tensorboard", "stop_after_epochs", "keep_checkpoints")
# Methods with a schedule over the run's total steps: num_epochs is part of
# their identity and cannot change on resume.
LENGTH_DEPENDENT_METHODS = ("fogzo",)
# Metrics that measure time, not the run's result.
TIMING_KEYS = ("wall_time", "epoch_time", "steps_per_second")
METHODS = tuple(sorted(methods.METHODS))


class ConfigMismatchError(ValueError):
  """The workdir holds a run with another configuration."""


# ---------------------------------------------------------------- config --

def _json_config(config) -> Dict[str, Any]:
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(cfg, default=list))


def _flatten(d: Mapping, prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_differences(saved: Mapping, current: Mapping) -> List[str]:
  """The fields (dotted names) where two JSON configs differ.

  Fields of :data:`RUN_CONTROL_FIELDS` are ignored, and so is ``num_epochs``
  for methods not in :data:`LENGTH_DEPENDENT_METHODS` (a run may be
  extended; see the module docstring).

  Examples:
    >>> config_differences({"method": "laq", "bits": 1, "seed": 0},
    ...                    {"method": "blaq", "bits": 1, "seed": 0})
    ["method: 'laq' (saved) vs 'blaq' (now)"]
  """
  a, b = _flatten(saved), _flatten(current)
  ignored = set(RUN_CONTROL_FIELDS)
  if (a.get("method") == b.get("method")
      and b.get("method") not in LENGTH_DEPENDENT_METHODS):
    ignored.add("num_epochs")
  out = []
  for key in sorted(set(a) | set(b)):
    if key.split(".")[0] in ignored:
      continue
    va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
    if va != vb:
      out.append(f"{key}: {va!r} (saved) vs {vb!r} (now)")
  return out


def check_workdir_config(workdir: str, config) -> None:
  """Raises :class:`ConfigMismatchError` if ``workdir`` holds another run."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    if (pathlib.Path(workdir) / "checkpoints").exists() and any(
        (pathlib.Path(workdir) / "checkpoints").iterdir()):
      raise ConfigMismatchError(
          f"{workdir} holds checkpoints but no config.json: refusing to "
          "resume a run of unknown configuration. Use another --workdir.")
    return
  saved = json.loads(path.read_text())
  diff = config_differences(saved, _json_config(config))
  if diff:
    raise ConfigMismatchError(
        f"--workdir {workdir} holds a run with another configuration; it "
        "was not resumed and nothing in it was changed. Differing fields:\n  "
        + "\n  ".join(diff) + "\nUse a new --workdir, or the saved values "
        f"(see {path}) to resume it.")


def _write_config(workdir: str, config, is_main: bool) -> None:
  """Writes ``config.json`` for a new run, or an extended run's ``num_epochs``."""
  if not is_main:
    return
  path = pathlib.Path(workdir) / "config.json"
  saved = json.loads(path.read_text()) if path.exists() else None
  if saved is None:
    saved = _json_config(config)
  elif saved.get("num_epochs") == config.num_epochs:
    return
  saved["num_epochs"] = config.num_epochs
  path.write_text(json.dumps(saved, indent=2, sort_keys=True))


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The configuration saved in ``workdir/config.json``."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"No config.json in {workdir}: pass --config "
                            "or a workdir written by experiments.train.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


# ------------------------------------------------------------------ data --

def _subset(xy, n):
  x, y = xy
  return (x[:n], y[:n]) if n and n < len(y) else (x, y)


def load_data(config):
  """Splits (subsets as configured) and the dataset info."""
  options = dict(config.dataset_options.to_dict()) if hasattr(
      config.dataset_options, "to_dict") else dict(config.dataset_options)
  splits, info = data_lib.get_dataset(config.dataset,
                                      config.data_dir or None, **options)
  splits = dict(splits)
  for name, size in (("train", config.train_size),
                     ("validation", config.validation_size),
                     ("test", config.test_size)):
    if size < 0:
      raise ValueError(f"config.{name}_size must be >= 0, got {size}.")
    if name in splits:
      splits[name] = _subset(splits[name], size)
  return splits, info


def _augment(config, info):
  if config.augment == "default":
    return info.augment
  if config.augment == "none":
    return None
  return config.augment


# -------------------------------------------------------------- devices --

def make_mesh(config) -> jax.sharding.Mesh:
  """The 1-D ``"data"`` mesh; checks the batch sizes divide over it."""
  devices = jax.devices()
  if config.num_devices:
    if jax.process_count() > 1:
      raise ValueError("config.num_devices must be 0 (all devices) in a "
                       "multi-process run.")
    if not 0 < config.num_devices <= len(devices):
      raise ValueError(f"config.num_devices={config.num_devices}, but "
                       f"{len(devices)} devices are available.")
    devices = devices[:config.num_devices]
  n = len(devices)
  if config.batch_size % n:
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by the {n} "
        f"devices of the data-parallel mesh; choose a batch size that is a "
        f"multiple of {n} (or set --config.num_devices).")
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} is not "
                     f"divisible by the {jax.process_count()} processes.")
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def global_batch(mesh, local: Mapping[str, np.ndarray]):
  """A process-local batch as global arrays sharded on ``"data"``."""
  if "data" not in mesh.axis_names:
    raise ValueError(
        f"The mesh has axes {tuple(mesh.axis_names)} but no 'data' axis to "
        "shard the batch over; build it with the data-parallel axis named "
        "'data' (see make_mesh).")
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


# --------------------------------------------------------------- method --

def learning_rate_schedule(config, steps_per_epoch: int):
  """``lr * decay_rate ** (epoch // decay_every_epochs)`` on the step."""
  if config.lr_decay_every_epochs < 1:
    raise ValueError("config.lr_decay_every_epochs must be >= 1, got "
                     f"{config.lr_decay_every_epochs}.")
  return optax.exponential_decay(
      config.learning_rate,
      transition_steps=config.lr_decay_every_epochs * steps_per_epoch,
      decay_rate=config.lr_decay_rate, staircase=True)


def quantize_rule(config):
  return models_lib.quantize_rule(config.model, config.bits,
                                  edge_bits=config.edge_bits)


def blaq_schedule(config, steps_per_epoch: int):
  """BLAQ's ``active`` schedule: one epoch in ``config.blaq_period_epochs``."""
  return blaq_jax.one_epoch_every(config.blaq_period_epochs, steps_per_epoch)


def make_optimizer(config, steps_per_epoch: int, total_steps: int, *,
                   blaq_active=None):
  """The method ``config.method`` with the config's hyper-parameters.

  ``blaq_active`` replaces BLAQ's schedule (:func:`blaq_schedule`), e.g.
  ``1`` (every step) or :func:`blaq_jax.never`.
  """
  name = config.method
  if name not in methods.METHODS:
    raise ValueError(f"Unknown config.method {name!r}; choose one of "
                     f"{list(METHODS)}.")
  lr = learning_rate_schedule(config, steps_per_epoch)
  if name == "fp":
    return methods.create(name, lr)
  kw: Dict[str, Any] = dict(quantize=quantize_rule(config))
  if config.per_channel:
    kw["channel_axis"] = -1
  if config.clip_latent:
    kw["clip_latent"] = config.clip_latent
  if name in ("bc", "bwn") and config.bits != 1:
    raise ValueError(f"method {name!r} is binary: set --config.bits=1 (got "
                     f"{config.bits}).")
  if name == "twn" and config.bits != 2:
    raise ValueError("method 'twn' is ternary (2 bits): set "
                     f"--config.bits=2 (got {config.bits}).")
  if name in ("bc", "bwn", "twn"):
    if name == "bc" and "channel_axis" in kw:
      raise ValueError("method 'bc' has no scale: per_channel must be False.")
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


# ------------------------------------------------------------- the model --

class Setup:
  """Everything a run builds from its config before the first step."""

  def __init__(self, config, workdir: Optional[str] = None):
    self.config = config
    self.workdir = workdir
    self.mesh = make_mesh(config)
    self.replicated = NamedSharding(self.mesh, P())
    self.splits, self.info = load_data(config)
    if config.loss not in losses_lib.LOSSES:
      raise ValueError(f"Unknown config.loss {config.loss!r}; choose one of "
                       f"{sorted(losses_lib.LOSSES)}.")
    self.loss = losses_lib.LOSSES[config.loss]
    n_proc = jax.process_count()
    self.local_batch = config.batch_size // n_proc
    x, y = self.splits["train"]
    self.loader_kw = dict(batch_size=self.local_batch, seed=config.seed,
                          augment=_augment(config, self.info))
    probe = data_lib.make_loader(x, y, **self.loader_kw)
    self.steps_per_epoch = probe.batches_per_epoch
    self.total_steps = self.steps_per_epoch * config.num_epochs
    self.tx = make_optimizer(config, self.steps_per_epoch, self.total_steps)
    self._compiled = {}
    self._build_model()

  # BLAQ's two phases. The schedule is known on the host, so the training
  # step is compiled once per phase (BLAQ with active=1, and with
  # active=never: LAQ's update) instead of once with a lax.cond: XLA:CPU
  # compiles convolutions inside a conditional's branch to a slow path (the
  # trial gradient of LeNet5 ran 9x slower than outside one). Both phases
  # have the same optimizer state as ``self.tx``, whose schedule they follow.

  def step_phase(self, step: int) -> Optional[bool]:
    """Whether BLAQ's two-stage update runs at ``step`` (None: not BLAQ)."""
    if self.config.method != "blaq":
      return None
    return bool(blaq_schedule(self.config, self.steps_per_epoch)(step))

  def compiled_step(self, phase: Optional[bool] = None):
    """The jitted train step of a phase (``None``: the method's own)."""
    if phase not in self._compiled:
      tx = self.tx
      if phase is not None:
        tx = make_optimizer(self.config, self.steps_per_epoch,
                            self.total_steps,
                            blaq_active=1 if phase else blaq_jax.never)
      self._compiled[phase] = jax.jit(
          functools.partial(self.train_step, tx=tx), donate_argnums=(0,),
          out_shardings=(self.replicated, self.replicated))
    return self._compiled[phase]

  def jit_train_step(self, state, batch, step: Optional[int] = None):
    """One training step; ``step`` (the count of steps done) picks BLAQ's
    phase, read from the state when not given."""
    if self.config.method == "blaq" and step is None:
      step = int(jax.device_get(optax.tree.get(state["opt_state"], "count")))
    return self.compiled_step(self.step_phase(step))(state, batch)

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
    if self.config.method != "fp":
      params = blaq_jax.quantized_params(params, opt_state)
    self.init_state = {"params": params, "batch_stats": rest,
                       "opt_state": opt_state}
    rule = quantize_rule(config)
    bits = ([0] * len(jax.tree.leaves(params)) if config.method == "fp"
            else [int(rule(p, x) or 0) for p, x in
                  jax.tree_util.tree_flatten_with_path(params)[0]])
    self.tracked = zigzag.choose_tracked(params, bits, config.num_tracked,
                                         config.seed)

  def model_outputs(self, graphdef, params, rest, images):
    model = nnx.merge(graphdef, nnx.State(params), nnx.State(rest))
    out = model(images)
    new_rest = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
    return out, new_rest

  # The jitted steps ---------------------------------------------------

  def train_step(self, state, batch, tx=None):
    tx = self.tx if tx is None else tx
    params, rest = state["params"], state["batch_stats"]
    images, labels = batch["image"], batch["label"]

    def forward(p, r):
      out, new_r = self.model_outputs(self.train_def, p, r, images)
      return self.loss(out, labels), (out, new_r)

    (loss, (out, new_rest)), grads = jax.value_and_grad(
        forward, has_aux=True)(params, rest)
    # Evaluations at other params: same batch, statistics discarded.
    grad_fn = jax.grad(lambda p: forward(p, rest)[0])
    loss_fn = lambda p: forward(p, rest)[0]  # noqa: E731
    updates, opt_state = tx.update(grads, state["opt_state"], params,
                                        grad_fn=grad_fn, loss_fn=loss_fn)
    new_params = optax.apply_updates(params, updates)
    diag = zigzag.step_diagnostics(opt_state)
    zo_active = optax.tree.get(opt_state, "active", default=None)
    n_zo = self.config.fogzo.n if self.config.method in (
        "fogzo", "n_spsa") else 0
    metrics = dict(
        loss=loss,
        accuracy=losses_lib.accuracy(out, labels),
        grad_evals=1 + diag["trial_active"].astype(jnp.int32),
        loss_evals=(2 * n_zo * jnp.asarray(zo_active, jnp.int32)
                    if zo_active is not None else jnp.zeros([], jnp.int32)),
        tracked_latent=zigzag.gather_tracked(
            zigzag.latent_or_params(new_params, opt_state), self.tracked),
        tracked_quantized=zigzag.gather_tracked(new_params, self.tracked),
        tracked_code=zigzag.gather_tracked(
            zigzag.codes_or_signs(new_params, opt_state), self.tracked),
        **diag)
    new_state = {"params": new_params, "batch_stats": new_rest,
                 "opt_state": opt_state}
    return new_state, metrics

  def eval_step(self, state, batch):
    out, _ = self.model_outputs(self.eval_def, state["params"],
                                state["batch_stats"], batch["image"])
    labels, mask = batch["label"], batch["mask"]
    per_example = jax.vmap(lambda o, l: self.loss(o[None], l[None]))(
        out, labels)
    correct = (jnp.argmax(out, -1) == labels).astype(jnp.float32)
    return dict(loss=jnp.sum(per_example * mask),
                correct=jnp.sum(correct * mask), count=jnp.sum(mask))

  @functools.cached_property
  def jit_eval_step(self):
    return jax.jit(self.eval_step, out_shardings=self.replicated)

  def place(self, state):
    return jax.device_put(state, self.replicated)

  def evaluate(self, state, split: str) -> Dict[str, float]:
    """Loss and accuracy on a whole split (padded last batch masked)."""
    x, y = self.splits[split]
    n_dev = self.mesh.devices.size
    size = -(-self.config.eval_batch_size // n_dev) * n_dev
    n_proc, pid = jax.process_count(), jax.process_index()
    per_proc = size // n_proc
    totals = dict(loss=0.0, correct=0.0, count=0.0)
    for start in range(0, len(y), size):
      idx = np.arange(start, start + size)
      mask = (idx < len(y)).astype(np.float32)
      idx = np.minimum(idx, len(y) - 1)[pid * per_proc:(pid + 1) * per_proc]
      local = {"image": np.asarray(x[idx], np.float32),
               "label": np.asarray(y[idx], np.int32),
               "mask": mask[pid * per_proc:(pid + 1) * per_proc]}
      out = jax.device_get(self.jit_eval_step(
          state, global_batch(self.mesh, local)))
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


# ------------------------------------------------------- checkpointing --

def _leaf_names(tree) -> List[str]:
  return [blaq_jax.path_str(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(tree)[0]]


class Checkpoints:
  """Orbax checkpoints of the train state (every leaf, in a list) + meta.

  The train state holds custom pytree nodes (quantized tensors, masked
  nodes); saving its leaves as a list and restoring them into the
  structure built from the config keeps orbax out of that.
  """

  def __init__(self, directory: str, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self.ocp = ocp
    self.directory = directory
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep),
                                             create=True),
        item_names=("state", "meta"))

  def latest(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, epoch: int, state, meta: Dict[str, Any]) -> None:
    meta = dict(meta, leaf_names=_leaf_names(state),
                process_count=jax.process_count())
    self.manager.save(epoch, args=self.ocp.args.Composite(
        state=self.ocp.args.StandardSave({"leaves": jax.tree.leaves(state)}),
        meta=self.ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def restore(self, epoch: int, like, sharding):
    abstract = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x),
                                     sharding=sharding)
                for x in jax.tree.leaves(like)]
    meta = self.manager.restore(epoch, args=self.ocp.args.Composite(
        meta=self.ocp.args.JsonRestore()))["meta"]
    saved_procs = meta.get("process_count", 1)
    if saved_procs != jax.process_count():
      raise ConfigMismatchError(
          f"The checkpoint of epoch {epoch} in {self.directory} was written "
          f"by {saved_procs} process(es); this run has "
          f"{jax.process_count()}. Resume it with {saved_procs} process(es) "
          "(the input shards and the order of the cross-host reductions "
          "depend on the count, so the result would not be that of an "
          "uninterrupted run), or start a new --workdir.")
    names = _leaf_names(like)
    if meta.get("leaf_names") != names:
      raise ConfigMismatchError(
          "The checkpoint's state does not have the structure this config "
          "builds (leaves differ); was it written by another version?")
    restored = self.manager.restore(epoch, args=self.ocp.args.Composite(
        state=self.ocp.args.StandardRestore({"leaves": abstract})))
    leaves = restored["state"]["leaves"]
    return jax.tree.unflatten(jax.tree.structure(like), leaves), meta

  def close(self):
    self.manager.close()


# ------------------------------------------------------------- logging --

class MetricWriter:
  """JSON lines (and TensorBoard if installed), on process 0 only."""

  def __init__(self, workdir: str, *, tensorboard: bool, enabled: bool):
    self.enabled = enabled
    self.dir = pathlib.Path(workdir) / "metrics"
    self.tb = None
    if not enabled:
      return
    self.dir.mkdir(parents=True, exist_ok=True)
    if tensorboard:
      self.tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))

  def truncate(self, max_step: int, max_epoch: int) -> None:
    """Drops records written after the checkpoint being resumed."""
    if not self.enabled:
      return
    for name, key, limit in (("steps", "step", max_step),
                             ("epochs", "epoch", max_epoch)):
      records = [r for r in read_jsonl(self.dir / f"{name}.jsonl")
                 if r[key] <= limit]
      with open(self.dir / f"{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)

  def write(self, name: str, records: List[Dict[str, Any]],
            step_key: str) -> None:
    if not self.enabled or not records:
      return
    with open(self.dir / f"{name}.jsonl", "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    if self.tb is not None:
      for r in records:
        for k, v in r.items():
          if k != step_key and isinstance(v, (int, float)):
            self.tb(f"{name}/{k}", v, r[step_key])


def _tensorboard_writer(logdir: str):
  """``write(tag, value, step)`` with tensorboardX or tf.summary, or None."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    writer = SummaryWriter(logdir)
    return lambda tag, v, s: (writer.add_scalar(tag, v, s), writer.flush())
  except ImportError:
    pass
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  writer = tf.summary.create_file_writer(logdir)

  def write(tag, value, step):
    with writer.as_default():
      tf.summary.scalar(tag, value, step=step)
    writer.flush()
  return write


def read_jsonl(path) -> List[Dict[str, Any]]:
  """The records of a JSON-lines file ([] if it does not exist)."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()
          if line.strip()]


def _progress(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)


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
    ConfigMismatchError: ``workdir`` holds a run with another config.
    ValueError: a bad config value (named in the message).
  """
  is_main = jax.process_index() == 0
  check_workdir_config(workdir, config)
  setup = Setup(config, workdir)
  os.makedirs(workdir, exist_ok=True)

  ckpt = Checkpoints(os.path.join(workdir, "checkpoints"),
                     config.keep_checkpoints)
  writer = MetricWriter(workdir, tensorboard=config.tensorboard,
                        enabled=is_main)
  state = setup.place(setup.init_state)
  meta = dict(epoch=0, step=0, grad_evals=0, loss_evals=0, wall_time=0.0)
  latest = ckpt.latest()
  if latest is not None:
    state, saved = ckpt.restore(latest, state, setup.replicated)
    meta.update({k: saved[k] for k in meta})
    if meta["epoch"] > config.num_epochs:
      ckpt.close()
      raise ConfigMismatchError(
          f"--workdir {workdir} holds {meta['epoch']} epochs; "
          f"num_epochs={config.num_epochs} would shorten the run. Use "
          f"num_epochs >= {meta['epoch']} or a new --workdir.")
  _write_config(workdir, config, is_main)
  writer.truncate(meta["step"], meta["epoch"])
  zz_dir = pathlib.Path(workdir) / "zigzag"
  if is_main:
    zz_dir.mkdir(parents=True, exist_ok=True)
    for f in zz_dir.glob("epoch_*.npz"):
      if int(f.stem.split("_")[1]) > meta["epoch"]:
        f.unlink()

  x, y = setup.splits["train"]
  loader = data_lib.make_loader(
      x, y, num_epochs=config.num_epochs,
      start_index=meta["epoch"] * setup.steps_per_epoch, **setup.loader_kw)
  batches = iter(loader)
  last = config.num_epochs
  if config.stop_after_epochs:
    last = min(last, config.stop_after_epochs)
  lr_fn = learning_rate_schedule(config, setup.steps_per_epoch)
  log_every = max(1, config.log_every_steps)

  for epoch in range(meta["epoch"], last):
    t0 = time.perf_counter()
    bar = _progress(setup.steps_per_epoch, f"epoch {epoch + 1}/{last}",
                    config.progress_bar and is_main)
    per_step = []
    for i in range(setup.steps_per_epoch):
      batch = global_batch(setup.mesh, next(batches))
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
    step_records = []
    for i, m in enumerate(per_step):
      step = step0 + i + 1
      if step % log_every == 0 or i == len(per_step) - 1:
        step_records.append(dict(
            step=step, epoch=epoch + 1, lr=float(lr_fn(step - 1)),
            loss=float(m["loss"]), accuracy=float(m["accuracy"]),
            flip_fraction=float(m["flip_fraction"]),
            update_cosine=float(m["update_cosine"]),
            trial_active=bool(m["trial_active"])))
    meta["step"] = step0 + len(per_step)
    meta["grad_evals"] += int(sum(int(m["grad_evals"]) for m in per_step))
    meta["loss_evals"] += int(sum(int(m["loss_evals"]) for m in per_step))
    evals = setup.evaluate_all(state)
    epoch_time = time.perf_counter() - t0
    meta["wall_time"] += epoch_time
    meta["epoch"] = epoch + 1

    def mean(key):
      return float(np.mean([float(m[key]) for m in per_step]))

    record = dict(
        epoch=epoch + 1, step=meta["step"],
        lr=float(lr_fn(meta["step"] - 1)),
        train_loss=mean("loss"), train_accuracy=mean("accuracy"),
        flip_fraction=mean("flip_fraction"),
        update_cosine=mean("update_cosine"),
        trial_active_fraction=mean("trial_active"),
        grad_evals=meta["grad_evals"], loss_evals=meta["loss_evals"],
        **evals, epoch_time=epoch_time, wall_time=meta["wall_time"],
        steps_per_second=len(per_step) / train_time)
    writer.write("steps", step_records, "step")
    writer.write("epochs", [record], "epoch")
    if is_main:
      np.savez(zz_dir / f"epoch_{epoch + 1:04d}.npz",
               step=np.arange(step0 + 1, meta["step"] + 1),
               latent=np.stack([m["tracked_latent"] for m in per_step]),
               quantized=np.stack([m["tracked_quantized"] for m in per_step]),
               code=np.stack([m["tracked_code"] for m in per_step]),
               tracked=np.asarray(setup.tracked, np.int64).reshape(-1, 2))
      print(_epoch_line(record), flush=True)
    ckpt.save(epoch + 1, state, meta)
  ckpt.close()

  summary = summarize(workdir, config)
  if is_main:
    (pathlib.Path(workdir) / "summary.json").write_text(
        json.dumps(summary, indent=2))
    if config.write_plots:
      write_plots(workdir)
  return summary


def _epoch_line(r: Mapping[str, Any]) -> str:
  parts = [f"epoch {r['epoch']}", f"loss {r['train_loss']:.4f}",
           f"train acc {100 * r['train_accuracy']:.2f}%"]
  if "validation_accuracy" in r:
    parts.append(f"val acc {100 * r['validation_accuracy']:.2f}%")
  if "test_accuracy" in r:
    parts.append(f"test acc {100 * r['test_accuracy']:.2f}%")
  parts.append(f"{r['epoch_time']:.1f}s")
  return ", ".join(parts)


def load_trace(workdir: str, first_epoch: int = 1):
  """``(steps, latent, quantized, code)`` of the zig-zag trace from an epoch.
  """
  files = sorted((pathlib.Path(workdir) / "zigzag").glob("epoch_*.npz"))
  files = [f for f in files if int(f.stem.split("_")[1]) >= first_epoch]
  if not files:
    return None
  parts = [np.load(f) for f in files]
  return (np.concatenate([p["step"] for p in parts]),
          np.concatenate([p["latent"] for p in parts]),
          np.concatenate([p["quantized"] for p in parts]),
          np.concatenate([p["code"] for p in parts]))


def summarize(workdir: str, config) -> Dict[str, Any]:
  """The summary of the epochs recorded in ``workdir``."""
  epochs = read_jsonl(pathlib.Path(workdir) / "metrics" / "epochs.jsonl")
  out: Dict[str, Any] = dict(method=config.method, bits=config.bits,
                             seed=config.seed, epochs=len(epochs))
  if not epochs:
    return out
  last = epochs[-1]
  out.update(step=last["step"], grad_evals=last["grad_evals"],
             loss_evals=last["loss_evals"], wall_time=last["wall_time"],
             final_train_loss=last["train_loss"])
  for split in ("test", "validation"):
    key = f"{split}_accuracy"
    if key in last:
      out[f"final_{key}"] = last[key]
      out[f"best_{key}"] = max(r[key] for r in epochs)
  trace = load_trace(workdir, first_epoch=config.num_epochs // 2 + 1)
  if trace is not None and trace[1].shape[0] >= 2 and trace[1].shape[1]:
    out["zigzag"] = zigzag.table1_stats(trace[1], trace[3])
  return out


def write_plots(workdir: str) -> List[str]:
  """Training loss, test accuracy and zig-zag plots of one run."""
  root = pathlib.Path(workdir)
  steps = read_jsonl(root / "metrics" / "steps.jsonl")
  epochs = read_jsonl(root / "metrics" / "epochs.jsonl")
  label = json.loads((root / "config.json").read_text())["method"]
  out = [plots.plot_training_loss({label: steps},
                                  str(root / "plots" / "train_loss.png")),
         plots.plot_test_accuracy({label: epochs},
                                  str(root / "plots" / "test_accuracy.png"))]
  trace = load_trace(workdir)
  out.append(plots.plot_zigzag(
      steps, str(root / "plots" / "zigzag.png"),
      steps=None if trace is None else trace[0],
      latent=None if trace is None else trace[1],
      quantized=None if trace is None else trace[2]))
  return out


# ------------------------------------------------------- eval / export --

def restore_latest(workdir: str, config):
  """``(setup, state, meta)`` of the latest checkpoint of ``workdir``."""
  check_workdir_config(workdir, config)
  setup = Setup(config, workdir)
  ckpt = Checkpoints(os.path.join(workdir, "checkpoints"),
                     config.keep_checkpoints)
  latest = ckpt.latest()
  if latest is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints.")
  state, meta = ckpt.restore(latest, setup.place(setup.init_state),
                             setup.replicated)
  ckpt.close()
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
  """Exports the latest checkpoint with :func:`blaq_jax.export`.

  With ``print_summary`` also prints :func:`blaq_jax.summary`'s per-layer
  size table and the file's size.
  """
  setup, state, meta = restore_latest(workdir, config)
  path = path or os.path.join(workdir, "export", "model.safetensors")
  tree = _merge_trees(state["params"], state["batch_stats"])
  opt_state = None if config.method == "fp" else state["opt_state"]
  if jax.process_index() == 0:
    tree, opt_state = jax.device_get((tree, opt_state))
    blaq_jax.export(path, tree, opt_state,
                    metadata=dict(config=_json_config(config),
                                  epoch=meta["epoch"], step=meta["step"]))
    if print_summary:
      blaq_jax.summary(tree, opt_state)
      print(f"{path}: {os.path.getsize(path):,} bytes")
  return path


def evaluate_workdir(workdir: str, config,
                     from_export: Optional[str] = None) -> Dict[str, float]:
  """Test/validation metrics of the latest checkpoint, or of an export.

  With ``from_export`` the params and batch statistics are those loaded by
  :func:`blaq_jax.load` (the packed low-bit weights), evaluated with the
  model built from ``config``.
  """
  if from_export:
    check_workdir_config(workdir, config)
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


# ----------------------------------------------------------------- main --

def quiet_orbax_logging() -> None:
  """Drops orbax's per-save INFO lines (they bury the progress bar)."""
  import logging  # pylint: disable=g-import-not-at-top

  class _Filter(logging.Filter):

    def filter(self, record):
      return record.levelno > logging.INFO or "orbax" not in record.pathname

  for handler in logging.getLogger().handlers + logging.getLogger(
      "absl").handlers:
    handler.addFilter(_Filter())


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  quiet_orbax_logging()
  flags_ = flags.FLAGS
  commands = [a for a in argv[1:]]
  command = commands[0] if commands else "train"
  if command not in ("train", "eval", "export") or len(commands) > 1:
    raise SystemExit(f"Unknown command {' '.join(commands)!r}: use train "
                     "(default), eval or export.")
  if flags_.jax_distributed:
    # With no flags, the coordinator, process count and id come from the
    # cluster environment (TPU pods, SLURM, ...); the flags set them by hand,
    # e.g. several processes on one machine.
    jax.distributed.initialize(
        coordinator_address=flags_.coordinator_address,
        num_processes=flags_.num_processes, process_id=flags_.process_id)
  workdir = flags_.workdir
  config = flags_.config
  if config is None:
    if command == "train":
      raise SystemExit("train needs --config.")
    config = load_workdir_config(workdir)
  if command == "train":
    summary = train_and_evaluate(config, workdir)
  elif command == "export":
    summary = {"export": export_checkpoint(workdir, config,
                                           flags_.export_path,
                                           print_summary=True)}
  else:
    summary = evaluate_workdir(workdir, config, flags_.from_export)
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=2))


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Training configuration file (experiments/configs/).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory of the run.")
  flags.DEFINE_string("export_path", None,
                      "export: output file (default workdir/export/"
                      "model.safetensors).")
  flags.DEFINE_string("from_export", None,
                      "eval: evaluate this blaq_jax export instead of the "
                      "latest checkpoint.")
  flags.DEFINE_bool("jax_distributed", False,
                    "Call jax.distributed.initialize() first (multi-host: "
                    "one process per host).")
  flags.DEFINE_string("coordinator_address", None,
                      "With --jax_distributed: host:port of process 0.")
  flags.DEFINE_integer("num_processes", None,
                       "With --jax_distributed: number of processes.")
  flags.DEFINE_integer("process_id", None,
                       "With --jax_distributed: this process's index.")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
