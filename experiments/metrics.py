"""Metrics of a run: JSON lines, TensorBoard, progress, summary and plots.

A run writes, under its workdir (process 0 only),

* ``metrics/steps.jsonl``: one record every ``log_every_steps`` (loss,
  accuracy, learning rate, the method's per-step diagnostics),
* ``metrics/epochs.jsonl``: one record per epoch (means over the epoch's
  steps, evaluation metrics, gradient and loss evaluations, the steps the
  method skipped for a non-finite gradient, times),
* ``tensorboard/`` when a TensorBoard writer (tensorboardX or TensorFlow)
  is installed, ``summary.json`` and ``plots/*.png``.

On a terminal each epoch draws a progress bar; otherwise (a log file, a
pipe) only one line per epoch is printed (:func:`epoch_line`).

Example:
  >>> from experiments.metrics import epoch_line
  >>> epoch_line(dict(epoch=2, train_loss=0.25, train_accuracy=0.9,
  ...                 test_accuracy=0.95, epoch_time=1.5))
  'epoch 2, loss 0.2500, train acc 90.00%, test acc 95.00%, 1.5s'
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any, Callable, Dict, List, Mapping, Sequence

import numpy as np

from experiments import plots
from experiments import zigzag

# Metrics that measure time, not the run's result.
TIMING_KEYS = ("wall_time", "epoch_time", "steps_per_second")


def read_jsonl(path) -> List[Dict[str, Any]]:
  """The records of a JSON-lines file ([] if it does not exist)."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()
          if line.strip()]


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


def progress_bar(total: int, desc: str, enabled: bool, stream=None):
  """A tqdm bar on ``stream`` (stdout) if enabled and it is a terminal.

  Written to a file or a pipe, a bar is a flood of carriage returns: there
  the training loop prints :func:`epoch_line` once per epoch instead.
  """
  stream = sys.stdout if stream is None else stream
  if not enabled or not stream.isatty():
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True,
              file=stream)


def epoch_line(r: Mapping[str, Any]) -> str:
  """The one line printed per epoch."""
  parts = [f"epoch {r['epoch']}", f"loss {r['train_loss']:.4f}",
           f"train acc {100 * r['train_accuracy']:.2f}%"]
  if "validation_accuracy" in r:
    parts.append(f"val acc {100 * r['validation_accuracy']:.2f}%")
  if "test_accuracy" in r:
    parts.append(f"test acc {100 * r['test_accuracy']:.2f}%")
  if r.get("skipped_steps"):
    parts.append(f"{r['skipped_steps']} step(s) skipped so far (non-finite "
                 "gradient)")
  parts.append(f"{r['epoch_time']:.1f}s")
  return ", ".join(parts)


def step_records(per_step: Sequence[Mapping[str, Any]], *, first_step: int,
                 epoch: int, lr_fn: Callable[[int], Any],
                 log_every: int) -> List[Dict[str, Any]]:
  """The ``steps.jsonl`` records of one epoch (every ``log_every`` steps and
  the epoch's last). ``first_step`` is the count of steps before it."""
  out = []
  for i, m in enumerate(per_step):
    step = first_step + i + 1
    if step % log_every == 0 or i == len(per_step) - 1:
      out.append(dict(
          step=step, epoch=epoch, lr=float(lr_fn(step - 1)),
          loss=float(m["loss"]), accuracy=float(m["accuracy"]),
          flip_fraction=float(m["flip_fraction"]),
          update_cosine=float(m["update_cosine"]),
          trial_active=bool(m["trial_active"])))
  return out


def epoch_means(per_step: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
  """Means over an epoch's steps of the logged per-step metrics."""
  def mean(key):
    return float(np.mean([float(m[key]) for m in per_step]))
  return dict(train_loss=mean("loss"), train_accuracy=mean("accuracy"),
              flip_fraction=mean("flip_fraction"),
              update_cosine=mean("update_cosine"),
              trial_active_fraction=mean("trial_active"))


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


def write_trace(workdir: str, epoch: int, first_step: int,
                per_step: Sequence[Mapping[str, Any]], tracked) -> None:
  """Saves an epoch's zig-zag trace to ``zigzag/epoch_XXXX.npz``."""
  zz_dir = pathlib.Path(workdir) / "zigzag"
  zz_dir.mkdir(parents=True, exist_ok=True)
  np.savez(zz_dir / f"epoch_{epoch:04d}.npz",
           step=np.arange(first_step + 1, first_step + len(per_step) + 1),
           latent=np.stack([m["tracked_latent"] for m in per_step]),
           quantized=np.stack([m["tracked_quantized"] for m in per_step]),
           code=np.stack([m["tracked_code"] for m in per_step]),
           tracked=np.asarray(tracked, np.int64).reshape(-1, 2))


def truncate_traces(workdir: str, max_epoch: int) -> None:
  """Drops the traces of epochs after the checkpoint being resumed."""
  for f in (pathlib.Path(workdir) / "zigzag").glob("epoch_*.npz"):
    if int(f.stem.split("_")[1]) > max_epoch:
      f.unlink()
