r"""Runs several methods with the same seeds and writes one table and one plot.

Usage (the README's main job: a short BLAQ-vs-LAQ run on MNIST)::

  python -m experiments.compare --config experiments/configs/quick.py \
      --methods laq,blaq --workdir runs/quick
  python -m experiments.compare --config experiments/configs/mnist_mlp.py \
      --methods fp,bc,bwn,laq,blaq --seeds 0,1,2 --workdir runs/table2

Each ``(method, seed)`` trains with :func:`experiments.train.train_and_evaluate`
in ``WORKDIR/<method>/seed_<seed>`` (rerunning resumes or reuses finished
runs; ``--config.x=...`` overrides apply to all of them). The table,
``WORKDIR/results.md`` (also printed), has per method the mean and spread
(half the range, ``max - min`` over 2, over seeds; ``±0`` with one seed) of

* final and best test accuracy,
* the epochs and the wall time to first reach the target accuracy
  (``--target``; default: the lowest final mean test accuracy among the
  methods, which every method reaches),
* gradient evaluations (BLAQ's active steps cost two) and total wall time.

``WORKDIR/comparison.png`` shows the training loss and the test accuracy per
epoch of every method (mean over seeds, band: spread).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from experiments import plots
from experiments import train as train_lib


def mean_spread(values: Sequence[float]):
  """``(mean, half the range)`` of the non-None values (``(None, None)``)."""
  values = np.asarray([v for v in values if v is not None], float)
  if not values.size:
    return None, None
  return float(values.mean()), float((values.max() - values.min()) / 2)


def format_stat(stat, scale: float = 1.0, digits: int = 2) -> str:
  """``"mean ± spread"`` of a :func:`mean_spread` pair, scaled."""
  mean, spread = stat
  if mean is None:
    return "not reached"
  return f"{scale * mean:.{digits}f} ± {scale * spread:.{digits}f}"


def time_to_target(epochs: List[Mapping], target: float,
                   key: str = "test_accuracy"):
  """``(epoch, wall time)`` when ``key`` first reaches ``target`` (or None).

  Examples:
    >>> time_to_target([{"epoch": 1, "test_accuracy": 0.5, "wall_time": 2.0},
    ...                 {"epoch": 2, "test_accuracy": 0.9, "wall_time": 4.0}],
    ...                0.8)
    (2, 4.0)
  """
  for r in epochs:
    if r.get(key) is not None and r[key] >= target:
      return r["epoch"], r["wall_time"]
  return None, None


def run_all(config, methods: Sequence[str], seeds: Sequence[int],
            workdir: str) -> Dict[str, List[Dict[str, Any]]]:
  """Trains every ``(method, seed)``; returns the epoch records per run."""
  runs: Dict[str, List[Dict[str, Any]]] = {}
  for method in methods:
    runs[method] = []
    for seed in seeds:
      cfg = config.copy_and_resolve_references()
      cfg.unlock()
      cfg.method = method
      cfg.seed = seed
      run_dir = os.path.join(workdir, method, f"seed_{seed}")
      print(f"== {method}, seed {seed} -> {run_dir}", flush=True)
      summary = train_lib.train_and_evaluate(cfg, run_dir)
      root = pathlib.Path(run_dir) / "metrics"
      runs[method].append(dict(
          summary=summary,
          epochs=train_lib.read_jsonl(root / "epochs.jsonl"),
          steps=train_lib.read_jsonl(root / "steps.jsonl")))
  return runs


def results_table(runs: Mapping[str, List[Mapping]],
                  target: Optional[float] = None) -> str:
  """The markdown table of :func:`run_all`'s results (see module doc)."""
  finals = {m: mean_spread([r["summary"].get("final_test_accuracy") for r in rs])
            for m, rs in runs.items()}
  if target is None:
    reached = [s[0] for s in finals.values() if s[0] is not None]
    target = min(reached) if reached else 0.0
  n_seeds = max(len(rs) for rs in runs.values())
  lines = [
      f"Target test accuracy: {100 * target:.2f}%. Mean ± spread (half "
      f"the range) over {n_seeds} seed(s).",
      "",
      "| method | final test acc (%) | best test acc (%) | epochs to "
      "target | time to target (s) | grad evals | wall time (s) |",
      "|---|---|---|---|---|---|---|"]
  for method, rs in runs.items():
    best = mean_spread([r["summary"].get("best_test_accuracy") for r in rs])
    hits = [time_to_target(r["epochs"], target) for r in rs]
    if any(h[0] is None for h in hits):
      n_hit = sum(h[0] is not None for h in hits)
      ep = tt = f"not reached ({len(hits) - n_hit}/{len(hits)} runs)"
    else:
      ep = format_stat(mean_spread([h[0] for h in hits]), digits=1)
      tt = format_stat(mean_spread([h[1] for h in hits]), digits=1)
    ge = mean_spread([r["summary"].get("grad_evals") for r in rs])
    wall = mean_spread([r["summary"].get("wall_time") for r in rs])
    lines.append(
        f"| {method} | {format_stat(finals[method], 100)} | {format_stat(best, 100)} | "
        f"{ep} | {tt} | {format_stat(ge, digits=0)} | {format_stat(wall, digits=1)} |")
  return "\n".join(lines)


def _mean_curve(records_per_seed: List[List[Mapping]], x: str, y: str):
  curves = [[r for r in recs if y in r] for recs in records_per_seed]
  n = min(len(c) for c in curves)
  if n == 0:
    return [], []
  xs = [c[x] for c in curves[0][:n]]
  ys = np.array([[c[y] for c in cur[:n]] for cur in curves], float)
  mean = ys.mean(0)
  half = (ys.max(0) - ys.min(0)) / 2
  return [{x: xi, y: yi} for xi, yi in zip(xs, mean)], half


def plot_comparison(runs: Mapping[str, List[Mapping]], path: str) -> str:
  """Training loss (left) and test accuracy per epoch (right) per method."""
  plt = plots._pyplot()  # pylint: disable=protected-access
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for method, rs in runs.items():
    # Per-epoch mean: a minibatch's squared hinge loss is often exactly 0.
    loss, _ = _mean_curve([r["epochs"] for r in rs], "epoch", "train_loss")
    acc, half = _mean_curve([r["epochs"] for r in rs], "epoch",
                            "test_accuracy")
    if loss:
      ax_loss.plot([r["epoch"] for r in loss],
                   [r["train_loss"] for r in loss], marker="o", ms=3,
                   label=method)
    if acc:
      x = np.array([r["epoch"] for r in acc])
      y = 100 * np.array([r["test_accuracy"] for r in acc])
      (line,) = ax_acc.plot(x, y, marker="o", ms=3, label=method)
      ax_acc.fill_between(x, y - 100 * half, y + 100 * half, alpha=0.2,
                          color=line.get_color())
  ax_loss.set(xlabel="epoch", ylabel="training loss (epoch mean)",
              yscale="log", title="Training loss (mean over seeds)")
  ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)",
             title="Test accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  return plots._save(fig, path)  # pylint: disable=protected-access


def compare(config, methods: Sequence[str], seeds: Sequence[int],
            workdir: str, target: Optional[float] = None) -> str:
  """Runs, writes ``results.md``, ``results.json`` and ``comparison.png``.

  Returns:
    The markdown table.
  """
  unknown = [m for m in methods if m not in train_lib.METHODS]
  if unknown:
    raise ValueError(f"Unknown method(s) {unknown}; choose from "
                     f"{list(train_lib.METHODS)}.")
  if not methods or not seeds:
    raise ValueError("Need at least one method and one seed.")
  runs = run_all(config, methods, seeds, workdir)
  table = results_table(runs, target)
  root = pathlib.Path(workdir)
  (root / "results.md").write_text(table + "\n")
  (root / "results.json").write_text(json.dumps(
      {m: [r["summary"] for r in rs] for m, rs in runs.items()}, indent=2))
  plot_comparison(runs, str(root / "comparison.png"))
  return table


def _csv(text: str, cast=str) -> List:
  return [cast(t) for t in text.split(",") if t.strip()]


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  train_lib.quiet_orbax_logging()
  f = flags.FLAGS
  table = compare(f.config, _csv(f.methods), _csv(f.seeds, int), f.workdir,
                  f.target)
  print(table)
  print(f"\nWritten: {os.path.join(f.workdir, 'results.md')}, "
        f"{os.path.join(f.workdir, 'comparison.png')}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Configuration file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory of the comparison.")
  flags.DEFINE_string("methods", "laq,blaq", "Comma-separated methods.")
  flags.DEFINE_string("seeds", "0", "Comma-separated seeds.")
  flags.DEFINE_float("target", None, "Target test accuracy in [0, 1].")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
