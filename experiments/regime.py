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
  per-step outputs (the zig-zag traces of :mod:`experiments.regime_zigzag`).
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
  t0 = time.time()
  for epoch in range(settings.epochs):
    order = np.stack([data_order(s, epoch, n, settings.batch_size)
                      for s in seeds])
    state, metrics = runner.run_epoch(state, x, y, jnp.asarray(order), lr)
    metrics = jax.device_get(metrics)
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
      git_commit=_git_commit(), jax_version=jax.__version__, complete=True)


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
                  f"Results: regime map cell {path.stem} (raw per-seed "
                  "per-epoch metrics)", "--", rel], cwd=repo, check=False)


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
  args = p.parse_args(argv)
  if args.command == "run":
    settings = Settings(**{f.name: getattr(args, f.name)
                           for f in dataclasses.fields(Settings)})
    cells = grid(args.datasets.split(","), _ints(args.bits),
                 _floats(args.lrs), args.methods.split(","))
    return run_grid(cells, settings, args.out, data_dir=args.data_dir,
                    log=lambda s: print(time.strftime("%H:%M:%S"), s,
                                        flush=True),
                    on_cell_done=_commit if args.commit else None)
  from experiments import regime_report  # pylint: disable=g-import-not-at-top
  return regime_report.report(args.out, _targets(args.targets),
                              summary=args.summary,
                              command=" ".join(shlex.quote(a)
                                               for a in sys.argv))


if __name__ == "__main__":
  main()
