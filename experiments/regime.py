r"""Paired-seed regime map: where does BLAQ beat LAQ on real networks?

Theorem 2 of the BLAQ paper predicts a gain only where the step is large
against the curvature (:math:`\eta > 2 / (L (1 + a))`). This driver trains
the narrow MLP of ``configs/quick.py`` (784-256-256-256-10, batch norm,
squared hinge, batch 100) with LAQ and with BLAQ active on every step
(``m = 1``) in each reading of Algorithm 1 (``blend`` in ``moments``,
``lookahead``, ``gradients``; see ``shared/METHOD.md``), over a grid of
datasets, learning rates and bit widths.

A *cell* is one ``(dataset, bits, learning rate, method)``. All seeds of a
cell train at once under ``jax.vmap`` (params, optimizer state, batch-norm
statistics and data order carry a leading seed axis), and a whole epoch runs
in one ``lax.scan``. Seed ``s`` fixes the initialisation
(``nnx.Rngs(s)``) and the data order of every epoch
(``numpy.random.default_rng([s, epoch]).permutation``) for every method: the
differences between methods at one seed are paired. The learning rate is a
traced argument, so the learning rates of a ``(method, bits)`` share one
compiled step:

.. math::

  \eta_t = \eta \cdot \begin{cases} 1 & t < (E - E_d) S \\
                                     \rho & \text{otherwise,} \end{cases}

with ``E`` epochs of ``S`` steps, decay ``rho`` over the last ``E_d``
epochs.

Every cell writes one JSON file (per seed and per epoch: mean training loss,
validation and test accuracy and loss) under ``--out``; a cell whose file is
complete is skipped, so the grid can be stopped and resumed.
``report`` reads those files and writes the paired-difference tables and
heat maps (BLAQ reading minus LAQ, test accuracy at the epoch of best
validation accuracy of each run) and the epochs to a target accuracy fixed on
the command line.

``lenet5`` trains LeNet5 with LAQ and with BLAQ in one reading the same
way, tracing a fixed set of quantized weights (latent value and code after
every step) and the per-step flip fraction and update cosine; its
``lenet5-report`` gives the zig-zag statistics over a window of active steps
as distributions over the tracked weights, paired by seed.

Example (a tiny grid; the real command is in
``experiments/results/regime/summary.md``):

  python -m experiments.regime run --datasets mnist --bits 1 --lrs 0.005 \
      --methods laq,blaq_moments --seeds 2 --epochs 1 --train_size 1000 \
      --out /tmp/regime

  >>> cell = Cell("mnist", 1, 0.005, "blaq_lookahead")
  >>> cell.name
  'mnist_b1_lr0.005_blaq_lookahead'
  >>> cell.blend
  'lookahead'
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import blaq_jax
from experiments import data as data_lib
from experiments import losses as losses_lib
from experiments import models as models_lib
from experiments import zigzag

METHODS = ("laq", "blaq_moments", "blaq_lookahead", "blaq_gradients")
READINGS = ("moments", "lookahead", "gradients")
MLP_HIDDEN = (256, 256, 256)  # configs/quick.py
RESULTS = pathlib.Path(__file__).parent / "results" / "regime"


@dataclasses.dataclass(frozen=True)
class Cell:
  """One point of the grid: all seeds of it train together.

  Attributes:
    dataset: ``"mnist"`` or ``"fashion_mnist"``.
    bits: bit width of the quantized kernels.
    lr: the base learning rate ``eta``.
    method: one of :data:`METHODS` (``"blaq_<reading>"``).
  """
  dataset: str
  bits: int
  lr: float
  method: str

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"Cell: unknown method {self.method!r}; choose one of "
                       f"{METHODS}.")

  @property
  def name(self) -> str:
    return f"{self.dataset}_b{self.bits}_lr{self.lr:g}_{self.method}"

  @property
  def blend(self) -> Optional[str]:
    """The reading of a BLAQ method, ``None`` for LAQ."""
    return self.method.split("_", 1)[1] if self.method != "laq" else None


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every cell of a grid shares (the file of a cell records them).

  Attributes:
    seeds: number of paired seeds (seeds ``0 .. seeds - 1``).
    epochs: training epochs ``E``.
    decay_epochs: the last ``E_d`` epochs run at ``lr * decay``.
    decay: the late decay factor ``rho``.
    train_size: first examples of the 50k training split (0: all).
    validation_size, test_size: first examples of those splits (0: all).
    batch_size: minibatch per seed.
    a: BLAQ's blend weight.
    model: ``"mlp"`` (the quick MLP) or ``"lenet5"``.
  """
  seeds: int = 8
  epochs: int = 4
  decay_epochs: int = 1
  decay: float = 0.1
  train_size: int = 0
  validation_size: int = 0
  test_size: int = 0
  batch_size: int = 100
  a: float = 0.6
  model: str = "mlp"

  def __post_init__(self):
    if self.seeds < 1 or self.epochs < 1 or self.batch_size < 1:
      raise ValueError(f"Settings: seeds, epochs and batch_size must be >= 1, "
                       f"got {self.seeds}, {self.epochs}, {self.batch_size}.")
    if not 0 <= self.decay_epochs <= self.epochs:
      raise ValueError(f"Settings: decay_epochs must be in [0, epochs="
                       f"{self.epochs}], got {self.decay_epochs}.")


# ----------------------------------------------------------------- data --

def load_splits(dataset: str, settings: Settings, data_dir=None):
  """The paper's 50k/10k/10k split, cut to the settings' sizes, as jnp."""
  splits, _ = data_lib.get_dataset(dataset, data_dir)
  out = {}
  for name, size in (("train", settings.train_size),
                     ("validation", settings.validation_size),
                     ("test", settings.test_size)):
    x, y = splits[name]
    if size:
      if size > len(y):
        raise ValueError(f"{name}_size={size} exceeds the {len(y)} examples "
                         f"of {dataset}'s {name} split.")
      x, y = x[:size], y[:size]
    out[name] = (jnp.asarray(x), jnp.asarray(y))
  return out


def data_order(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
  """Example indices ``[steps, batch]`` of one epoch of seed ``seed``.

  The same for every method: the pairing of the seeds.

  Examples:
    >>> data_order(0, 0, 10, 4).shape  # the last incomplete batch is dropped
    (2, 4)
  """
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  steps = n // batch_size
  if steps == 0:
    raise ValueError(f"data_order: {n} examples give no batch of "
                     f"{batch_size}.")
  return perm[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


# ---------------------------------------------------------------- model --

def create_model(settings: Settings, seed: int) -> nnx.Module:
  if settings.model == "mlp":
    return models_lib.create_model("mlp", num_classes=10,
                                   rngs=nnx.Rngs(seed), hidden=MLP_HIDDEN)
  if settings.model == "lenet5":
    return models_lib.create_model("lenet5", num_classes=10,
                                   rngs=nnx.Rngs(seed), channels=(20, 50),
                                   hidden=(500,), image_shape=(28, 28, 1))
  raise ValueError(f"Settings.model must be 'mlp' or 'lenet5', got "
                   f"{settings.model!r}.")


def make_tx(method: str, bits: int, learning_rate, *, a: float = 0.6,
            model: str = "mlp", diagnostics: bool = True):
  """LAQ, or BLAQ active on every step (``m = 1``) in one reading."""
  kw = dict(bits=bits, quantize=models_lib.quantize_rule(model, bits),
            diagnostics=diagnostics)
  if method == "laq":
    return blaq_jax.laq(learning_rate, **kw)
  if method not in METHODS:
    raise ValueError(f"make_tx: unknown method {method!r}; choose one of "
                     f"{METHODS}.")
  return blaq_jax.blaq(learning_rate, a=a, active=1,
                       blend=method.split("_", 1)[1], **kw)


def lr_schedule(lr, settings: Settings, steps_per_epoch: int):
  """``lr``, times ``decay`` over the last ``decay_epochs`` epochs."""
  boundary = (settings.epochs - settings.decay_epochs) * steps_per_epoch
  return lambda count: lr * jnp.where(count >= boundary, settings.decay, 1.0)


class Runner:
  """Compiled training and evaluation of one ``(method, bits)`` family.

  The step function of one seed is :meth:`train_step`; :meth:`run_epoch`
  maps it over the seed axis (``jax.vmap``) and scans it over an epoch.
  ``record`` (optional) maps ``(state_after_step, step_metrics)`` to extra
  per-step outputs (the zig-zag traces of :func:`zigzag_recorder`).
  """

  def __init__(self, method: str, bits: int, settings: Settings,
               steps_per_epoch: int, *, diagnostics: bool = True,
               record: Optional[Callable[..., Dict[str, Any]]] = None):
    self.method, self.bits, self.settings = method, bits, settings
    self.steps_per_epoch = steps_per_epoch
    self.diagnostics = diagnostics
    self.record = record
    self.loss = losses_lib.squared_hinge_loss
    model = create_model(settings, 0)
    model.train()
    self.train_def = nnx.split(model, nnx.Param, ...)[0]
    model.eval()
    self.eval_def = nnx.split(model, nnx.Param, ...)[0]
    self.run_epoch = jax.jit(self._run_epoch, donate_argnums=(0,))
    self.evaluate = jax.jit(self._evaluate)

  def tx(self, lr):
    return make_tx(self.method, self.bits,
                   lr_schedule(lr, self.settings, self.steps_per_epoch),
                   a=self.settings.a, model=self.settings.model,
                   diagnostics=self.diagnostics)

  def init(self, seeds: Sequence[int]):
    """The stacked state ``{params, batch_stats, opt_state}`` of the seeds.

    Seed ``s`` initialises the model with ``nnx.Rngs(s)``; the params start
    on the level set (``blaq_jax.quantized_params`` of the initial state).
    """
    states = []
    tx = self.tx(0.0)  # the state does not depend on the learning rate
    for s in seeds:
      model = create_model(self.settings, int(s))
      model.train()
      _, params, rest = nnx.split(model, nnx.Param, ...)
      params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
      opt_state = tx.init(params)
      params = blaq_jax.quantized_params(params, opt_state)
      states.append({"params": params, "batch_stats": rest,
                     "opt_state": opt_state})
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)

  def _outputs(self, graphdef, params, rest, images):
    model = nnx.merge(graphdef, nnx.State(params), nnx.State(rest))
    out = model(images)
    return out, nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])

  def train_step(self, state, images, labels, lr):
    """One step of one seed: LAQ's or BLAQ's update on a minibatch."""
    params, rest = state["params"], state["batch_stats"]

    def forward(p, r):
      out, new_r = self._outputs(self.train_def, p, r, images)
      return self.loss(out, labels), (out, new_r)

    (loss, (out, new_rest)), grads = jax.value_and_grad(
        forward, has_aux=True)(params, rest)
    # The trial gradient: same minibatch, its batch statistics discarded.
    grad_fn = jax.grad(lambda p: forward(p, rest)[0])
    updates, opt_state = self.tx(lr).update(grads, state["opt_state"], params,
                                            grad_fn=grad_fn)
    new_state = {"params": optax.apply_updates(params, updates),
                 "batch_stats": new_rest, "opt_state": opt_state}
    metrics = {"loss": loss, "accuracy": losses_lib.accuracy(out, labels)}
    return new_state, metrics

  def _run_epoch(self, state, x, y, order, lr):
    """``order``: ``[seeds, steps, batch]`` indices into ``x``, ``y``."""
    step = jax.vmap(self.train_step, in_axes=(0, 0, 0, None))

    def body(state, idx):  # idx: [seeds, batch]
      state, metrics = step(state, x[idx], y[idx], lr)
      if self.record is not None:
        metrics = {**metrics, **jax.vmap(self.record)(state, metrics)}
      return state, metrics

    state, metrics = jax.lax.scan(body, state, jnp.swapaxes(order, 0, 1))
    return state, jax.tree.map(lambda m: jnp.swapaxes(m, 0, 1), metrics)

  def _evaluate(self, state, x, y, chunk: int = 1000):
    """Per seed: mean loss and accuracy on ``(x, y)`` with running stats."""
    n = y.shape[0]
    pad = -n % chunk
    xs = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    ys = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)])
    mask = jnp.arange(n + pad) < n
    xs = xs.reshape((-1, chunk) + x.shape[1:])
    ys, mask = ys.reshape(-1, chunk), mask.reshape(-1, chunk)

    def one_seed(params, rest):
      def chunk_sums(args):
        xb, yb, mb = args
        out, _ = self._outputs(self.eval_def, params, rest, xb)
        per = jax.vmap(lambda o, l: self.loss(o[None], l[None]))(out, yb)
        right = (jnp.argmax(out, -1) == yb)
        return jnp.sum(per * mb), jnp.sum(right * mb)
      loss, right = jax.lax.map(chunk_sums, (xs, ys, mask))
      return jnp.sum(loss) / n, jnp.sum(right) / n

    return jax.vmap(one_seed)(state["params"], state["batch_stats"])


@functools.lru_cache(maxsize=None)
def _runner(method, bits, settings, steps_per_epoch):
  return Runner(method, bits, settings, steps_per_epoch)


# ------------------------------------------------------------ the cells --

def cell_path(out: pathlib.Path, cell: Cell) -> pathlib.Path:
  return pathlib.Path(out) / f"{cell.name}.json"


def _git_commit() -> str:
  if os.environ.get("REGIME_COMMIT"):
    return os.environ["REGIME_COMMIT"]
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True,
                          cwd=pathlib.Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def is_done(path: pathlib.Path, settings: Settings) -> bool:
  """Whether ``path`` holds a finished cell of these settings.

  A finished cell of other settings is an error (it would mix grids).
  """
  if not path.exists():
    return False
  record = json.loads(path.read_text())
  if record.get("settings") != dataclasses.asdict(settings):
    raise ValueError(f"{path}: written with settings {record.get('settings')}"
                     f", the grid now has {dataclasses.asdict(settings)}; "
                     "use another --out or remove the file.")
  return bool(record.get("complete"))


def train_cell(cell: Cell, settings: Settings, splits, *,
               runner: Optional[Runner] = None,
               log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Trains all seeds of ``cell``; returns the record written to its file."""
  x, y = splits["train"]
  n = int(y.shape[0])
  steps = n // settings.batch_size
  runner = runner or _runner(cell.method, cell.bits, settings, steps)
  seeds = list(range(settings.seeds))
  state = runner.init(seeds)
  lr = jnp.asarray(cell.lr, jnp.float32)
  keys = ("train_loss", "train_accuracy", "validation_loss",
          "validation_accuracy", "test_loss", "test_accuracy")
  hist = {k: [[] for _ in seeds] for k in keys}
  step_loss = [[] for _ in seeds]
  traces: Dict[str, List[np.ndarray]] = {}
  t0 = time.time()
  for epoch in range(settings.epochs):
    order = np.stack([data_order(s, epoch, n, settings.batch_size)
                      for s in seeds])
    state, metrics = runner.run_epoch(state, x, y, jnp.asarray(order), lr)
    metrics = jax.device_get(metrics)
    for k, v in metrics.items():  # what runner.record adds: [seeds, steps..]
      if k not in ("loss", "accuracy"):
        traces.setdefault(k, []).append(np.asarray(v))
    evals = {}
    for split in ("validation", "test"):
      loss, acc = jax.device_get(runner.evaluate(state, *splits[split]))
      evals[f"{split}_loss"], evals[f"{split}_accuracy"] = loss, acc
    for i in range(len(seeds)):
      hist["train_loss"][i].append(float(np.mean(metrics["loss"][i])))
      hist["train_accuracy"][i].append(float(np.mean(metrics["accuracy"][i])))
      step_loss[i].extend(float(v) for v in metrics["loss"][i])
      for k, v in evals.items():
        hist[k][i].append(float(v[i]))
    log(f"{cell.name} epoch {epoch + 1}/{settings.epochs}: test acc "
        f"{np.mean(evals['test_accuracy']):.4f} (mean of {len(seeds)}), "
        f"{time.time() - t0:.0f}s")
  return dict(
      name=cell.name, dataset=cell.dataset, bits=cell.bits, lr=cell.lr, method=cell.method,
      blend=cell.blend, seeds=seeds, settings=dataclasses.asdict(settings),
      steps_per_epoch=steps,
      grad_evals_per_step=1 if cell.method == "laq" else 2,
      lr_schedule=(f"{cell.lr:g} for epochs 1..{settings.epochs - settings.decay_epochs}"
                   f", x{settings.decay:g} after"),
      metrics=hist, step_train_loss=step_loss, wall_s=time.time() - t0,
      command=" ".join(shlex.quote(a) for a in sys.argv),
      git_commit=_git_commit(), jax_version=jax.__version__, complete=True,
      **({"traces": {k: np.concatenate(v, axis=1) for k, v in traces.items()}}
         if traces else {}))


def write_json(path: pathlib.Path, record: Mapping[str, Any]) -> None:
  """Atomic write: a killed run never leaves a half-written cell."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(record, indent=1))
  os.replace(tmp, path)


def grid(datasets, bits, lrs, methods) -> List[Cell]:
  """Cells in run order: bits, dataset, lr, method.

  A grid stopped early leaves whole paired groups (every method at one
  ``(dataset, bits, lr)``), 1 bit first. Compilation is shared anyway (one
  :class:`Runner` per method, bits and settings).

  Examples:
    >>> [c.name for c in grid(["mnist"], [1], [0.1, 0.2], ["laq"])]
    ['mnist_b1_lr0.1_laq', 'mnist_b1_lr0.2_laq']
  """
  return [Cell(d, b, float(lr), m) for b in bits for d in datasets
          for lr in lrs for m in methods]


def run_grid(cells: Sequence[Cell], settings: Settings, out, *,
             data_dir=None, log: Callable[[str], None] = print,
             on_cell_done: Optional[Callable[[pathlib.Path], None]] = None
             ) -> List[pathlib.Path]:
  """Trains the cells not finished yet under ``out``; returns their files."""
  out = pathlib.Path(out)
  written, splits, loaded = [], None, None
  for cell in cells:
    path = cell_path(out, cell)
    if is_done(path, settings):
      log(f"{cell.name}: done, skipped")
      continue
    if loaded != cell.dataset:
      splits, loaded = load_splits(cell.dataset, settings, data_dir), \
          cell.dataset
    record = train_cell(cell, settings, splits, log=log)
    write_json(path, record)
    written.append(path)
    if on_cell_done is not None:
      on_cell_done(path)
  return written


def _commit(path: pathlib.Path) -> None:
  """Commits one raw output (this module's results only)."""
  top = subprocess.run(["git", "rev-parse", "--show-toplevel"],
                       capture_output=True, text=True, check=False,
                       cwd=path.parent).stdout.strip()
  if not top:
    return
  repo = pathlib.Path(top)
  rel = os.path.relpath(path.resolve(), repo)
  for _ in range(10):
    if not (repo / ".git" / "index.lock").exists():
      break
    time.sleep(3)
  subprocess.run(["git", "add", rel], cwd=repo, check=False)
  subprocess.run(["git", "commit", "-q", "-m",
                  f"Results: {path.parent.name}/{path.name} (raw per-seed "
                  "per-epoch metrics of one cell)", "--", rel], cwd=repo, check=False)



# ---------------------------------------------------- LeNet5 zig-zag --

LENET5_RESULTS = RESULTS.parent / "lenet5_fmnist"


def tracked_entries(settings: Settings, bits: int, num: int):
  """A fixed set of quantized weights to trace, the same for every seed."""
  model = create_model(settings, 0)
  params = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
  rule = models_lib.quantize_rule(settings.model, bits)
  widths = [int(rule(p, x) or 0) for p, x in
            jax.tree_util.tree_flatten_with_path(params)[0]]
  return zigzag.choose_tracked(params, widths, num, seed=0)


def zigzag_recorder(tracked):
  """``record(state, metrics)``: tracked latents and codes, step signals."""
  def record(state, metrics):
    del metrics
    params, opt = state["params"], state["opt_state"]
    diag = zigzag.step_diagnostics(opt)
    return dict(
        latent=zigzag.gather_tracked(zigzag.latent_or_params(params, opt),
                                     tracked),
        code=zigzag.gather_tracked(zigzag.codes_or_signs(params, opt),
                                   tracked),
        flip_fraction=diag["flip_fraction"],
        update_cosine=diag["update_cosine"])
  return record


def zigzag_stats(latent, code, steps_per_epoch: int,
                 first_epoch: int) -> Dict[str, Any]:
  """Per tracked weight, over epochs ``first_epoch..`` (1-based) of one seed.

  ``latent``, ``code``: ``[steps, K]`` traces (after each step). Sampled
  per step: oscillation amplitude (half the largest swing between turning
  points) and flips (code changes) of each weight; sampled per epoch (the
  value at the end of each epoch, from the end of epoch ``first_epoch - 1``):
  the same on that coarser trace.
  """
  n_epochs = len(latent) // steps_per_epoch
  if not 1 <= first_epoch <= n_epochs:
    raise ValueError(f"zigzag_stats: first_epoch must be in [1, {n_epochs}],"
                     f" got {first_epoch}.")
  start = (first_epoch - 1) * steps_per_epoch
  lat, cod = np.asarray(latent)[start:], np.asarray(code)[start:]
  ends = np.arange(max(first_epoch - 1, 1), n_epochs + 1) * steps_per_epoch - 1
  e_lat, e_cod = np.asarray(latent)[ends], np.asarray(code)[ends]
  return dict(
      window_steps=int(lat.shape[0]),
      amplitude_step=zigzag.oscillation_amplitudes(lat).tolist(),
      flips_step=zigzag.flip_counts(cod).tolist(),
      amplitude_epoch=zigzag.oscillation_amplitudes(e_lat).tolist(),
      flips_epoch=zigzag.flip_counts(e_cod).tolist())


def run_lenet5(settings: Settings, blend: str, bits: int, lr: float, out, *,
               num_tracked: int, window_first_epoch: int,
               dataset: str = "fashion_mnist", data_dir=None,
               log: Callable[[str], None] = print,
               on_cell_done=None) -> List[pathlib.Path]:
  """LAQ and BLAQ-``blend`` on LeNet5 with the zig-zag traces (resumable).

  Each method writes ``<cell>.json`` (per-epoch metrics as the grid's, and
  per seed the zig-zag statistics of every tracked weight over the window,
  the per-step flip fraction and update cosine) and ``<cell>.npz`` (the
  traces of the tracked weights).
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  splits = None
  tracked = tracked_entries(settings, bits, num_tracked)
  written = []
  for method in ("laq", f"blaq_{blend}"):
    cell = Cell(dataset, bits, float(lr), method)
    path = cell_path(out, cell)
    if is_done(path, settings):
      log(f"{cell.name}: done, skipped")
      continue
    if splits is None:
      splits = load_splits(dataset, settings, data_dir)
    steps = int(splits["train"][1].shape[0]) // settings.batch_size
    runner = Runner(method, bits, settings, steps,
                    record=zigzag_recorder(tracked))
    record = train_cell(cell, settings, splits, runner=runner, log=log)
    traces = record.pop("traces")
    record["tracked"] = [list(t) for t in tracked]
    record["window_first_epoch"] = window_first_epoch
    record["zigzag"] = [
        zigzag_stats(traces["latent"][i], traces["code"][i], steps,
                     window_first_epoch) for i in range(len(record["seeds"]))]
    record["flip_fraction"] = traces["flip_fraction"].tolist()
    record["update_cosine"] = traces["update_cosine"].tolist()
    npz = path.with_suffix(".npz")
    np.savez_compressed(npz, latent=traces["latent"].astype(np.float32),
                        code=traces["code"].astype(np.int8))
    write_json(path, record)
    written += [path, npz]
    if on_cell_done is not None:
      on_cell_done(path)
      on_cell_done(npz)
  return written


# --------------------------------------------------------------- report --

def load_cells(out) -> List[Dict[str, Any]]:
  """The finished cell records under ``out`` (sorted by name)."""
  records = []
  for path in sorted(pathlib.Path(out).glob("*.json")):
    record = json.loads(path.read_text())
    if record.get("complete"):
      record["file"] = path.name
      records.append(record)
  return records


def epoch_records(record: Mapping[str, Any], seed_index: int) -> List[dict]:
  """Per epoch ``{epoch, step, validation_accuracy, test_accuracy, ...}``."""
  m = record["metrics"]
  steps = record["steps_per_epoch"]
  return [dict(epoch=e + 1, step=(e + 1) * steps,
               **{k: m[k][seed_index][e] for k in m})
          for e in range(len(m["test_accuracy"][seed_index]))]


def per_seed(record: Mapping[str, Any], fn) -> Dict[int, Any]:
  return {s: fn(epoch_records(record, i))
          for i, s in enumerate(record["seeds"])}


def selected_test_accuracy(record) -> Dict[int, float]:
  """Per seed, the test accuracy at the epoch of best validation accuracy."""
  from experiments import stats  # pylint: disable=g-import-not-at-top
  return per_seed(record, lambda r: stats.select_by_validation(r)[
      "test_accuracy"])


def _index(records):
  return {(r["dataset"], r["bits"], r["lr"], r["method"]): r for r in records}


def accuracy_rows(records) -> List[Dict[str, Any]]:
  """Per ``(dataset, bits, lr, reading)``: BLAQ minus LAQ, paired by seed."""
  from experiments import stats  # pylint: disable=g-import-not-at-top
  index, rows = _index(records), []
  for (dataset, bits, lr, method), blaq in sorted(index.items()):
    laq = index.get((dataset, bits, lr, "laq"))
    if method == "laq" or laq is None:
      continue
    x, y = selected_test_accuracy(blaq), selected_test_accuracy(laq)
    seeds, xs, ys = stats.paired_by_seed(x, y)
    final = lambda r: per_seed(r, lambda e: e[-1]["train_loss"])  # noqa: E731
    _, lx, ly = stats.paired_by_seed(final(blaq), final(laq))
    rows.append(dict(
        dataset=dataset, bits=bits, lr=lr, reading=method.split("_", 1)[1],
        seeds=seeds, laq=stats.summarize(ys), blaq=stats.summarize(xs),
        diff=stats.paired_difference(xs, ys),
        loss_diff=stats.paired_difference(lx, ly),
        files=(blaq["file"], laq["file"])))
  return rows


def target_rows(records, targets: Mapping[str, float]):
  """Per cell: epochs (and gradient evaluations) to the dataset's target."""
  from experiments import stats  # pylint: disable=g-import-not-at-top
  index, rows = _index(records), []
  for (dataset, bits, lr, method), rec in sorted(index.items()):
    if dataset not in targets:
      raise ValueError(f"report: no target for dataset {dataset!r} (cell "
                       f"{rec['file']}); give --targets {dataset}=<accuracy>.")
    hits = per_seed(rec, lambda r: stats.first_reaching(
        r, targets[dataset], key="test_accuracy", x="epoch"))
    laq = index.get((dataset, bits, lr, "laq"))
    diff = None
    if method != "laq" and laq is not None:
      base = per_seed(laq, lambda r: stats.first_reaching(
          r, targets[dataset], key="test_accuracy", x="epoch"))
      both = [s for s in hits if hits[s].reached and base.get(s) and
              base[s].reached]
      if len(both) >= 2:
        diff = stats.paired_difference([hits[s].at for s in both],
                                       [base[s].at for s in both])
    evals = [h.at * rec["steps_per_epoch"] * rec["grad_evals_per_step"]
             for h in hits.values() if h.reached]
    rows.append(dict(dataset=dataset, bits=bits, lr=lr, method=method,
                     hits=list(hits.values()), grad_evals=evals, diff=diff,
                     file=rec["file"]))
  return rows


def _pct(x):
  return "-" if x is None else f"{100 * x:.2f}"


def accuracy_table(rows) -> str:
  from experiments import stats  # pylint: disable=g-import-not-at-top
  lines = ["| lr | reading | n | LAQ test acc (%) | BLAQ test acc (%) | "
           "BLAQ - LAQ (points): mean, sd | 95% t-interval | excludes 0 | "
           "final train loss BLAQ - LAQ [95% CI] |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    d = r["diff"]
    sign = ("no" if d.low <= 0 <= d.high else
            ("**BLAQ better**" if d.low > 0 else "**LAQ better**"))
    lines.append(
        f"| {r['lr']:g} | {r['reading']} | {d.n} | "
        f"{stats.format_summary(r['laq'], 100)} | "
        f"{stats.format_summary(r['blaq'], 100)} | "
        f"{100 * d.mean:+.2f}, {100 * d.std:.2f} | "
        f"[{100 * d.low:+.2f}, {100 * d.high:+.2f}] | {sign} | "
        f"{stats.format_difference(r['loss_diff'], 1, 4)} |")
  return "\n".join(lines)


def target_table(rows, target: float) -> str:
  from experiments import stats  # pylint: disable=g-import-not-at-top
  lines = [f"| lr | method | epochs to {100 * target:g}% test acc | "
           "gradient evaluations to it | epochs BLAQ - LAQ (seeds where both "
           "reach) [95% CI] |", "|---|---|---|---|---|"]
  for r in rows:
    evals = (stats.format_summary(stats.summarize(r["grad_evals"]), 1, 0)
             if r["grad_evals"] else "-")
    diff = "-" if r["diff"] is None else stats.format_difference(
        r["diff"], 1, 2)
    lines.append(f"| {r['lr']:g} | {r['method']} | "
                 f"{stats.format_reach(r['hits'])} | {evals} | {diff} |")
  return "\n".join(lines)


def heat_map(rows, path) -> None:
  """Paired difference (points) over learning rate x reading.

  One panel per dataset (rows) and bit width (columns).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  datasets = sorted({r["dataset"] for r in rows})
  bits = sorted({r["bits"] for r in rows})
  lrs = sorted({r["lr"] for r in rows})
  vmax = max(0.1, max(abs(100 * r["diff"].mean) for r in rows))
  fig, axes = plt.subplots(len(datasets), len(bits), squeeze=False,
                           figsize=(4.4 * len(bits), 3.6 * len(datasets)),
                           constrained_layout=True)
  for a, dataset in enumerate(datasets):
    for b, bit in enumerate(bits):
      ax = axes[a, b]
      grid_ = np.full((len(lrs), len(READINGS)), np.nan)
      for r in rows:
        if (r["dataset"], r["bits"]) != (dataset, bit):
          continue
        i, j = lrs.index(r["lr"]), READINGS.index(r["reading"])
        d = r["diff"]
        grid_[i, j] = 100 * d.mean
        tell = not d.low <= 0 <= d.high
        ax.text(j, i, f"{100 * d.mean:+.2f}\n[{100 * d.low:+.2f}, "
                f"{100 * d.high:+.2f}]", ha="center", va="center",
                fontsize=8, fontweight="bold" if tell else "normal",
                color="white" if abs(100 * d.mean) > 0.6 * vmax else "black")
      im = ax.imshow(grid_, cmap="RdBu", vmin=-vmax, vmax=vmax,
                     aspect="auto")
      ax.set_xticks(range(len(READINGS)), READINGS)
      ax.set_yticks(range(len(lrs)), [f"{v:g}" for v in lrs])
      if a == len(datasets) - 1:
        ax.set_xlabel("reading (blend)")
      if b == 0:
        ax.set_ylabel("learning rate")
      ax.set_title(f"{dataset}, {bit} bit", fontsize=10)
  fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7,
               label="BLAQ - LAQ test accuracy (points)")
  fig.suptitle("BLAQ - LAQ at the validation-selected epoch, paired seeds: "
               "mean [95% t-interval]; bold: excludes 0", fontsize=9)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def module_command(command: str) -> str:
  """``python -m experiments.regime ...`` for a recorded ``sys.argv``.

  ``python -m`` records the module's file path as ``argv[0]``.

  >>> module_command("/tmp/x/experiments/regime.py run --seeds 8")
  'python -m experiments.regime run --seeds 8'
  """
  head, _, rest = command.partition(" ")
  if head.endswith("experiments/regime.py"):
    return f"python -m experiments.regime {rest}".strip()
  return command


def answer_lines(rows) -> List[str]:
  """Per reading: the cells where the 95% interval excludes 0, each way."""
  lines = []
  for reading in READINGS:
    sel = [r for r in rows if r["reading"] == reading]
    if not sel:
      continue
    better = [r for r in sel if r["diff"].low > 0]
    worse = [r for r in sel if r["diff"].high < 0]
    name = lambda r: (f"{r['dataset']} {r['bits']} bit lr {r['lr']:g} "  # noqa
                      f"({100 * r['diff'].mean:+.2f} "
                      f"[{100 * r['diff'].low:+.2f}, "
                      f"{100 * r['diff'].high:+.2f}])")
    lines.append(
        f"- **{reading}**: BLAQ better than LAQ (interval above 0) in "
        f"{len(better)} of {len(sel)} cells"
        + (": " + "; ".join(name(r) for r in better) if better else "")
        + f". LAQ better (interval below 0) in {len(worse)}"
        + (": " + "; ".join(name(r) for r in worse) if worse else "") + ".")
  return lines


def report(out, targets: Mapping[str, float], *, summary=None,
           command: str = "") -> str:
  """Writes ``regime_map.png`` and ``summary.md`` under ``out``."""
  out = pathlib.Path(out)
  records = load_cells(out)
  if not records:
    raise ValueError(f"report: no finished cell (*.json) under {out}.")
  rows = accuracy_rows(records)
  trows = target_rows(records, targets)
  settings = records[0]["settings"]
  png = out / "regime_map.png"
  if rows:
    heat_map(rows, png)
  cmds = sorted({module_command(r["command"]) for r in records})
  commits = sorted({r["git_commit"] for r in records})
  parts = [
      "# Regime map: BLAQ (m = 1) in each reading against LAQ, paired seeds",
      "",
      f"Written by `{command}` from the {len(records)} cell files in this "
      "folder, which were written by " +
      ", ".join(f"`{c}`" for c in cmds) + f" (run from a `git archive` "
      f"of commit {', '.join(commits)}, the library included).",
      "",
      f"Settings of every cell: `{json.dumps(settings)}`. Model: the quick "
      "MLP 784-256-256-256-10 (batch norm, squared hinge), Adam "
      "(b1 = 0.9, b2 = 0.999); BLAQ with a = 0.6 active on every step. "
      "Seed s fixes the initialisation and the data order for every "
      "method. Test accuracy is read at the epoch of best validation "
      "accuracy of each run (experiments/stats.py); the interval is the 95% "
      "Student-t interval of the paired difference over seeds.",
      "", f"Cut to fit 2 shared CPU cores (about an hour for the grid): "
      f"the first {settings['train_size'] or 50000} of the 50k training "
      f"examples, {settings['epochs']} epochs of "
      f"{records[0]['steps_per_epoch']} steps, the learning rate x"
      f"{settings['decay']:g} over the last {settings['decay_epochs']} "
      "epoch(s) only, the 256-wide quick MLP instead of the paper's "
      "2048-wide one (the paper: 50 epochs of 500 steps). Why and what "
      "was fixed before the runs: experiments/configs/regime_mlp.py.",
      "", "BLAQ takes 2 gradient evaluations per step, LAQ 1: the "
      "comparison is at equal steps and equal data, not equal compute.",
      "", f"![regime map]({png.name})", "", "## Answer, per reading", "",
      *answer_lines(rows), ""]
  for dataset, bits in sorted({(r["dataset"], r["bits"]) for r in records}):
    sel = [r for r in rows if (r["dataset"], r["bits"]) == (dataset, bits)]
    tsel = [r for r in trows if (r["dataset"], r["bits"]) == (dataset, bits)]
    parts += [f"## {dataset}, {bits} bit", "",
              f"Command: `{command}`", ""]
    if sel:
      parts += [accuracy_table(sel), ""]
    parts += [f"Epochs to the target {100 * targets[dataset]:g}% test "
              "accuracy (fixed before the runs in "
              "experiments/configs/regime_mlp.py), evaluated once per epoch "
              f"of {records[0]['steps_per_epoch']} steps; BLAQ takes 2 "
              "gradient evaluations per step, LAQ 1.", "",
              target_table(tsel, targets[dataset]), ""]
  text = "\n".join(parts)
  path = pathlib.Path(summary) if summary else out / "summary.md"
  path.write_text(text)
  return text



def lenet5_report(out, *, target: float, command: str = "") -> str:
  """``summary.md`` of the LeNet5 runs: accuracy and zig-zag, paired."""
  from experiments import stats  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(out)
  records = {r["method"]: r for r in load_cells(out)}
  if "laq" not in records or len(records) < 2:
    raise ValueError(f"lenet5 report: needs LAQ and one BLAQ cell under "
                     f"{out}, found {sorted(records)}.")
  laq = records["laq"]
  blaq_name = next(m for m in records if m != "laq")
  spe = laq["steps_per_epoch"]
  first = laq["window_first_epoch"]
  n_epochs = laq["settings"]["epochs"]

  def seed_values(rec, fn):
    return {s: fn(rec, i) for i, s in enumerate(rec["seeds"])}

  measures = {
      "test acc at the validation-selected epoch (%)": lambda r, i: 100 * (
          stats.select_by_validation(epoch_records(r, i))["test_accuracy"]),
      "final training loss (last epoch mean)": lambda r, i: r["metrics"][
          "train_loss"][i][-1],
      "amplitude per weight, per step, mean": lambda r, i: float(np.mean(
          r["zigzag"][i]["amplitude_step"])),
      "amplitude per weight, per step, median": lambda r, i: float(
          np.median(r["zigzag"][i]["amplitude_step"])),
      "amplitude per weight, per step, max": lambda r, i: float(np.max(
          r["zigzag"][i]["amplitude_step"])),
      "flips per weight in the window, per step, mean": lambda r, i: float(
          np.mean(r["zigzag"][i]["flips_step"])),
      "flips per weight in the window, per step, 90th pct": lambda r, i: float(
          np.percentile(r["zigzag"][i]["flips_step"], 90)),
      "amplitude per weight, per epoch, mean": lambda r, i: float(np.mean(
          r["zigzag"][i]["amplitude_epoch"])),
      "flips per weight, per epoch, mean": lambda r, i: float(np.mean(
          r["zigzag"][i]["flips_epoch"])),
      "flip fraction per step (all quantized weights), window mean": (
          lambda r, i: float(np.mean(r["flip_fraction"][i][(first - 1) *
                                                           spe:]))),
      "update cosine per step, window mean": lambda r, i: float(np.mean(
          r["update_cosine"][i][(first - 1) * spe:])),
  }
  lines = [f"| measure | LAQ | BLAQ ({blaq_name}) | BLAQ - LAQ [95% CI] |",
           "|---|---|---|---|"]
  for name, fn in measures.items():
    x, y = seed_values(records[blaq_name], fn), seed_values(laq, fn)
    _, xs, ys = stats.paired_by_seed(x, y)
    lines.append(f"| {name} | {stats.format_summary(stats.summarize(ys), 1, 4)}"
                 f" | {stats.format_summary(stats.summarize(xs), 1, 4)} | "
                 f"{stats.format_difference(stats.paired_difference(xs, ys), 1, 4)} |")
  # Distributions over tracked weights, pooled over seeds.
  dist = ["| method | sampled | amplitude p10 / p50 / p90 / max | flips p10 / "
          "p50 / p90 / max | weights x seeds |", "|---|---|---|---|---|"]
  for m in ("laq", blaq_name):
    for sampled in ("step", "epoch"):
      amp = np.concatenate([z[f"amplitude_{sampled}"]
                            for z in records[m]["zigzag"]])
      flips = np.concatenate([z[f"flips_{sampled}"]
                              for z in records[m]["zigzag"]])
      q = lambda v: " / ".join(f"{x:.3g}" for x in (  # noqa: E731
          *np.percentile(v, [10, 50, 90]), np.max(v)))
      dist.append(f"| {m} | per {sampled} | {q(amp)} | {q(flips)} | "
                  f"{amp.size} |")
  # Flip fraction per epoch (mean over the epoch's steps), mean over seeds.
  per_epoch = ["| epoch | " + " | ".join(
      f"{m} flip fraction (mean ± sd over seeds)" for m in ("laq", blaq_name))
      + " |", "|---|---|---|"]
  for e in range(n_epochs):
    cells = []
    for m in ("laq", blaq_name):
      v = [float(np.mean(ff[e * spe:(e + 1) * spe]))
           for ff in records[m]["flip_fraction"]]
      cells.append(stats.format_summary(stats.summarize(v), 1, 5))
    per_epoch.append(f"| {e + 1} | " + " | ".join(cells) + " |")
  hits = {m: per_seed(r, lambda er: stats.first_reaching(er, target))
          for m, r in records.items()}
  reach = ["| method | epochs to target |", "|---|---|"] + [
      f"| {m} | {stats.format_reach(list(h.values()))} |"
      for m, h in hits.items()]
  s = laq["settings"]
  text = "\n".join([
      "# LeNet5 on Fashion-MNIST: LAQ against BLAQ, paired seeds, zig-zag",
      "", f"Written by `{command}` from "
      + ", ".join(f"`{r['file']}`" for r in records.values())
      + " (and the traces in the `.npz` beside them), which were written by "
      f"`{module_command(laq['command'])}` (run from a `git archive` of "
      f"commit {laq['git_commit']}, the library included).", "",
      f"Settings: `{json.dumps(s)}`; {spe} steps per epoch; learning rate "
      f"{laq['lr_schedule']}; BLAQ active on every step (m = 1), a = "
      f"{s['a']}. Zig-zag window: epochs {first}..{n_epochs} "
      f"({(n_epochs - first + 1) * spe} steps, all of them active BLAQ "
      f"steps), {len(laq['tracked'])} tracked quantized weights (the same "
      "for every seed and method). Amplitude: half the largest swing "
      "between turning points of a weight's latent trajectory; flips: "
      "changes of its code; 'per step' samples after every step, 'per "
      "epoch' at the end of each epoch (an amplitude needs two turning "
      f"points, i.e. at least 4 samples: the window has "
      f"{n_epochs - max(first - 1, 1) + 1} epoch ends).", "",
      f"Command: `{command}`", "",
      "## Paired per-seed measures", "", *lines, "",
      "## Distributions over tracked weights (pooled over seeds)", "",
      *dist, "",
      "## Flip fraction per epoch (all quantized weights)", "", *per_epoch,
      "", f"## Epochs to {100 * target:g}% test accuracy (fixed before the "
      "runs in experiments/configs/regime_lenet5.py)", "", *reach, ""])
  (out / "summary.md").write_text(text)
  return text

# ------------------------------------------------------------------ CLI --

def _floats(s: str) -> List[float]:
  return [float(v) for v in s.split(",") if v]


def _ints(s: str) -> List[int]:
  return [int(v) for v in s.split(",") if v]


def _targets(s: str) -> Dict[str, float]:
  out = {}
  for item in filter(None, s.split(",")):
    name, _, value = item.partition("=")
    if not value:
      raise ValueError(f"--targets: expected dataset=accuracy, got {item!r}.")
    out[name] = float(value)
  return out


def main(argv: Optional[Sequence[str]] = None) -> Any:
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  r = sub.add_parser("run", help="train the cells not finished yet")
  r.add_argument("--datasets", default="fashion_mnist,mnist")
  r.add_argument("--bits", default="1,2")
  r.add_argument("--lrs", default="0.005,0.015,0.045")
  r.add_argument("--methods", default=",".join(METHODS))
  r.add_argument("--out", default=str(RESULTS))
  r.add_argument("--data_dir", default=None)
  r.add_argument("--commit", action="store_true",
                 help="git-commit each cell's JSON when it is written")
  for f in dataclasses.fields(Settings):
    r.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
  q = sub.add_parser("report", help="tables and heat maps of the cells")
  q.add_argument("--out", default=str(RESULTS))
  q.add_argument("--targets", required=True,
                 help="dataset=accuracy pairs fixed before the runs, e.g. "
                      "mnist=0.97,fashion_mnist=0.85")
  q.add_argument("--summary", default=None,
                 help="markdown file (default: <out>/summary.md)")
  z = sub.add_parser("lenet5", help="LeNet5 LAQ vs BLAQ with zig-zag "
                     "traces")
  z.add_argument("--blend", required=True, choices=READINGS)
  z.add_argument("--dataset", default="fashion_mnist")
  z.add_argument("--bits", type=int, default=1)
  z.add_argument("--lr", type=float, default=0.005)
  z.add_argument("--num_tracked", type=int, default=128)
  z.add_argument("--window_first_epoch", type=int, default=2)
  z.add_argument("--out", default=str(LENET5_RESULTS))
  z.add_argument("--data_dir", default=None)
  z.add_argument("--commit", action="store_true")
  for f in dataclasses.fields(Settings):
    default = dict(model="lenet5", batch_size=128, seeds=5).get(
        f.name, f.default)
    z.add_argument(f"--{f.name}", type=type(f.default), default=default)
  zr = sub.add_parser("lenet5-report", help="summary of the LeNet5 runs")
  zr.add_argument("--out", default=str(LENET5_RESULTS))
  zr.add_argument("--target", type=float, required=True,
                  help="test accuracy target fixed before the runs")
  args = p.parse_args(argv)
  command = " ".join(shlex.quote(a) for a in ["python", "-m",
                                               "experiments.regime", *(
                                                   sys.argv[1:] if argv is None
                                                   else argv)])
  log = lambda s: print(time.strftime("%H:%M:%S"), s, flush=True)  # noqa
  if args.command == "lenet5":
    settings = Settings(**{f.name: getattr(args, f.name)
                           for f in dataclasses.fields(Settings)})
    return run_lenet5(settings, args.blend, args.bits, args.lr, args.out,
                      num_tracked=args.num_tracked,
                      window_first_epoch=args.window_first_epoch,
                      dataset=args.dataset, data_dir=args.data_dir, log=log,
                      on_cell_done=_commit if args.commit else None)
  if args.command == "lenet5-report":
    return lenet5_report(args.out, target=args.target, command=command)
  if args.command == "run":
    settings = Settings(**{f.name: getattr(args, f.name)
                           for f in dataclasses.fields(Settings)})
    cells = grid(args.datasets.split(","), _ints(args.bits),
                 _floats(args.lrs), args.methods.split(","))
    return run_grid(cells, settings, args.out, data_dir=args.data_dir,
                    log=lambda s: print(time.strftime("%H:%M:%S"), s,
                                        flush=True),
                    on_cell_done=_commit if args.commit else None)
  return report(args.out, _targets(args.targets), summary=args.summary,
                command=command)


if __name__ == "__main__":
  main()
