"""Time of the full jitted training step per method, as a ratio to Adam's.

What is timed is exactly what ``experiments.train`` runs: the jitted step of
:class:`experiments.train.Setup` (forward, backward, the method's update,
``apply_updates``, the step's metrics) with the train state donated, built
from the paper's configuration of each model, on one fixed batch, on one
device. The methods run in interleaved rounds
(:func:`experiments.bench.common.time_interleaved`); the table reports
medians and ratios to the ``fp`` (Adam) step measured in the same run.

BLAQ is timed as training runs it: the step compiled for each phase of its
schedule (:meth:`experiments.train.Setup.compiled_step`). Its *inactive*
step (LAQ's update, no trial gradient) is timed from a state whose step
count lies in epoch 1, its *active* step (the two-stage update with the
trial gradient) from a state in epoch 0; every timed call is checked to
have taken the intended phase. ``blaq amortised`` is
``((m - 1) inactive + active) / m`` with the paper's ``m`` (5 for MNIST, 10
for ImageNet). ``grad only`` is the forward and backward pass of the same
model and batch without any update: the floor under every method.

Targets: LAQ within 1.15x of Adam (the MNIST MLP, whose step is mostly the
update: 1.3x, issue 15); BLAQ's active step within 2.2x; BLAQ amortised
within 1.4x. The ``met`` column says by how much a target is
missed.

ResNet-18 runs on the random ``synthetic_imagenet`` data (1000 classes) at
``--resnet-image`` pixels, with the ImageNet stem by default (7x7/2 conv and
max pool, the paper's architecture; ``experiments.train`` would pick the
CIFAR stem for images of 64 pixels or less unless told otherwise), so the
parameters are ResNet-18's 11.7M while the activations are those of small
images: on a CPU a batch of 224-pixel images takes minutes per step.

Usage::

  python -m experiments.bench.train_step --models mlp,lenet5,resnet18 \\
      --batch resnet18=32 --repeats 20

Example:
  >>> import contextlib, io
  >>> from experiments.bench.train_step import main
  >>> with contextlib.redirect_stdout(io.StringIO()):  # the printed table
  ...   rows = main(["--models", "mlp", "--hidden", "8", "--synthetic",
  ...                "--batch", "mlp=4", "--repeats", "1",
  ...                "--methods", "fp,laq"])
  >>> [r["method"] for r in rows]
  ['fp', 'laq']
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from experiments import data as data_lib
from experiments import input_pipeline
from experiments import train
from experiments.bench import common
from experiments.configs import imagenet_resnet18
from experiments.configs import mnist_lenet5
from experiments.configs import mnist_mlp

# model -> (configuration module, default batch size).
MODELS = {"mlp": (mnist_mlp, 100), "lenet5": (mnist_lenet5, 128),
          "resnet18": (imagenet_resnet18, 16)}
METHODS = ("grad only", "fp", "bc", "ste", "laq", "blaq inactive",
           "blaq active", "fogzo")
TARGETS = {"laq": 1.15, "blaq active": 2.2, "blaq amortised": 1.4}
MODEL_TARGETS = {("mlp", "laq"): 1.3}  # overrides TARGETS for one model
# BLAQ's timed states start at these epochs of one_epoch_every(m, ...).
BLAQ_EPOCH = {"blaq inactive": 1, "blaq active": 0}
WARMUP = 2


def make_config(model: str, method: str, *, batch: int, num_devices: int = 1,
                synthetic: bool = False, data_dir: str = "",
                hidden: Optional[Sequence[int]] = None,
                resnet_image: int = 64, resnet_stem: str = "imagenet",
                n_train: int = 2048, diagnostics: bool = True
                ) -> ml_collections.ConfigDict:
  """The paper's configuration of ``model`` for ``method`` at ``batch``.

  Args:
    model: a key of :data:`MODELS`.
    method: a method of :mod:`blaq_jax.methods` (``fp`` is Adam).
    batch: the global batch size.
    num_devices: devices of the data-parallel mesh.
    synthetic: MNIST-shaped random images instead of the MNIST originals.
    data_dir: where the MNIST originals are ("" for the default).
    hidden: FC widths replacing the model's (tests use tiny ones).
    resnet_image: ResNet-18's image side (synthetic ImageNet).
    resnet_stem: ResNet-18's stem, ``"imagenet"`` or ``"cifar"``.
    n_train: training examples of synthetic data (steps per epoch =
      ``n_train // batch``).
    diagnostics: the optimizer's diagnostics (``config.diagnostics``).
  """
  c = MODELS[model][0].get_config()
  c.method, c.batch_size, c.num_devices = method, batch, num_devices
  c.diagnostics = diagnostics
  c.data_dir = data_dir
  shape = None
  if model == "resnet18":
    c.dataset, shape = "synthetic_imagenet", (resnet_image, resnet_image, 3)
    c.model_options.stem = resnet_stem
  elif synthetic:
    c.dataset, shape = "synthetic_svhn", (28, 28, 1)
  if shape is not None:
    c.dataset_options = ml_collections.ConfigDict(dict(
        image_shape=shape, n_train=n_train, n_eval=8))
  if hidden:
    c.model_options.hidden = tuple(hidden)
  return c


def fixed_batch(setup: train.Setup):
  """The first training batch, sharded over the setup's mesh."""
  x, y = setup.splits["train"]
  loader = data_lib.make_loader(x, y, **setup.loader_kw)
  return input_pipeline.global_batch(setup.mesh, next(iter(loader)))


def fresh_state(setup: train.Setup):
  """A placed copy of the initial state (donating it leaves the setup's)."""
  return setup.place(jax.tree.map(jnp.copy, setup.init_state))


def step_runners(setup: train.Setup, batch, names: Sequence[str]):
  """Runners of the setup's compiled train step, one donated state each.

  A name of :data:`BLAQ_EPOCH` starts its state's step count at that epoch.

  Returns:
    ``(runners, compiled, check)``: name -> runner, name -> its compiled
    step, and ``check()`` which raises if a BLAQ runner took the other
    phase.
  """
  states, taken, compiled = {}, {name: [] for name in names}, {}
  for name in names:
    state = fresh_state(setup)
    step = BLAQ_EPOCH.get(name, 0) * setup.steps_per_epoch
    if name in BLAQ_EPOCH:
      state["opt_state"] = optax.tree.set(state["opt_state"],
                                          count=jnp.asarray(step, jnp.int32))
    states[name] = setup.place(state)
    compiled[name] = setup.compiled_step(setup.step_phase(step)).lower(
        states[name], batch).compile()

  def runner(name):
    def run():
      states[name], metrics = compiled[name](states[name], batch)
      taken[name].append(metrics["grad_evals"])  # 2 on an active step
      return states[name]
    return run

  def check():
    for name in BLAQ_EPOCH:
      want = name == "blaq active"
      if name in taken and any((int(a) > 1) != want for a in taken[name]):
        raise RuntimeError(f"{name}: a timed step took the other branch; "
                           "are there more timed steps than steps per "
                           f"epoch ({setup.steps_per_epoch})?")
  return {name: runner(name) for name in names}, compiled, check


def grad_runner(setup: train.Setup, batch) -> Callable[[], Any]:
  """A runner of the model's forward and backward pass alone."""
  def loss(params, rest):
    out, _ = setup.model_outputs(setup.train_def, params, rest,
                                 batch["image"])
    return setup.loss(out, batch["label"])

  fn = jax.jit(jax.value_and_grad(loss))
  state = fresh_state(setup)
  return lambda: fn(state["params"], state["batch_stats"])


def _met(ratio: float, target: Optional[float]) -> str:
  if target is None:
    return ""
  if ratio <= target:
    return "yes"
  return f"no (+{100 * (ratio / target - 1):.0f}%)"


def measure(model: str, methods: Sequence[str], *, repeats: int,
            **config_kw) -> List[Dict[str, Any]]:
  """Rows of one model's table (``fp`` is always timed, as the baseline)."""
  methods = ["fp"] + [m for m in methods if m != "fp"]
  n_train = config_kw["batch"] * (WARMUP + repeats + 1)
  runners, checks = {}, []
  for method in dict.fromkeys(x.split(" ")[0] for x in methods):
    if method == "grad":  # "grad only" runs with fp's setup
      continue
    setup = train.Setup(make_config(model, method, n_train=n_train,
                                    **config_kw))
    batch = fixed_batch(setup)
    names = [x for x in methods if x.split(" ")[0] == method]
    new, _, check = step_runners(setup, batch, names)
    runners.update(new)
    checks.append(check)
    if method == "fp":
      params = common.num_params(setup.init_state["params"])
      m = setup.config.blaq_period_epochs
      if "grad only" in methods:
        runners["grad only"] = grad_runner(setup, batch)
  samples = common.time_interleaved(runners, repeats=repeats, warmup=WARMUP)
  for check in checks:
    check()
  ms = {name: 1e3 * common.median(x) for name, x in samples.items()}
  if "blaq inactive" in ms and "blaq active" in ms:
    ms["blaq amortised"] = ((m - 1) * ms["blaq inactive"]
                            + ms["blaq active"]) / m
  rows = []
  for name in [x for x in METHODS + ("blaq amortised",) if x in ms]:
    ratio = ms[name] / ms["fp"]
    target = MODEL_TARGETS.get((model, name), TARGETS.get(name))
    rows.append(dict(model=model, method=name, ms=ms[name], ratio=ratio,
                     target=target, met=_met(ratio, target), params=params,
                     m=m))
  return rows


def _batches(spec: str) -> Dict[str, int]:
  out = {name: batch for name, (_, batch) in MODELS.items()}
  for item in filter(None, spec.split(",")):
    name, size = item.split("=")
    if name not in MODELS:
      raise ValueError(f"--batch: unknown model {name!r}; known: "
                       f"{sorted(MODELS)}.")
    out[name] = int(size)
  return out


def int_list(spec: Optional[str]):
  """``"16,16"`` -> ``(16, 16)``; None or "" -> None."""
  return tuple(int(x) for x in spec.split(",")) if spec else None


def _parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="mlp,lenet5,resnet18",
                 help=f"comma-separated subset of {','.join(MODELS)}")
  p.add_argument("--methods", default=",".join(METHODS),
                 help="comma-separated subset of: " + ", ".join(METHODS))
  p.add_argument("--repeats", type=int, default=20,
                 help="interleaved rounds (median over them)")
  p.add_argument("--batch", default="",
                 help="batch sizes as model=size pairs, e.g. resnet18=32 "
                 "(defaults: mlp=100, lenet5=128, resnet18=16)")
  p.add_argument("--hidden", default=None,
                 help="FC widths replacing the MLP's and LeNet5's, e.g. 16,16")
  p.add_argument("--resnet-image", type=int, default=64,
                 help="side of ResNet-18's synthetic ImageNet images")
  p.add_argument("--resnet-stem", default="imagenet",
                 choices=["imagenet", "cifar"])
  p.add_argument("--synthetic", action="store_true",
                 help="MNIST-shaped random images instead of MNIST")
  p.add_argument("--data-dir", default="", help="the MNIST originals")
  p.add_argument("--no-diagnostics", action="store_true",
                 help="build the methods without their diagnostics (the "
                 "library's default; the training application logs them)")
  return p


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  args = _parser().parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  unknown = set(methods) - set(METHODS)
  if unknown:
    raise ValueError(f"--methods: unknown {sorted(unknown)}; known: "
                     f"{list(METHODS)}.")
  batches = _batches(args.batch)
  print(f"machine: {common.machine()}")
  rows = []
  for model in filter(None, args.models.split(",")):
    r = measure(model, methods, repeats=args.repeats, batch=batches[model],
                synthetic=args.synthetic, data_dir=args.data_dir,
                hidden=int_list(args.hidden), resnet_image=args.resnet_image,
                resnet_stem=args.resnet_stem,
                diagnostics=not args.no_diagnostics)
    if model == "resnet18":
      data = (f"synthetic ImageNet {args.resnet_image}x{args.resnet_image}x3,"
              f" {args.resnet_stem} stem")
    else:
      data = "synthetic MNIST-shaped" if args.synthetic else "MNIST"
    print(f"\n{model}: {r[0]['params']:,} params, {data}, batch "
          f"{batches[model]}, 1 device, m = {r[0]['m']}; median of "
          f"{args.repeats} interleaved rounds" + (
              "; methods without diagnostics" if args.no_diagnostics
              else ""))
    print(common.markdown_table(
        ["method", "ms/step", "x fp (Adam)", "target", "met"],
        [[x["method"], x["ms"], x["ratio"],
          f"<= {x['target']}x" if x["target"] else "", x["met"]]
         for x in r]))
    rows += r
  return rows


if __name__ == "__main__":
  main()
