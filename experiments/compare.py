r"""Runs several methods with the same seeds and writes one table and one plot.

Usage (the README's main job: a short BLAQ-vs-LAQ run on MNIST)::

  python -m experiments.compare --config experiments/configs/quick.py \
      --methods laq,blaq --workdir runs/quick
  python -m experiments.compare --config experiments/configs/mnist_mlp.py \
      --methods fp,bc,bwn,laq,blaq --seeds 0,1,2 --workdir runs/table2

Each ``(method, seed)`` trains with :func:`experiments.train.train_and_evaluate`
in ``WORKDIR/<method>/seed_<seed>`` (rerunning resumes or reuses finished
runs; ``--config.x=...`` overrides apply to all of them). The table,
``WORKDIR/results.md`` (also printed), has per method, as mean ± sample
standard deviation with the number of seeds ``n`` (:mod:`experiments.stats`;
one seed: no spread),

* the final test accuracy, and the test accuracy at the epoch of best
  *validation* accuracy (needs ``validation_size > 0``; the epoch is never
  chosen on the test set);
* for every method after the first, the paired difference to the first
  method over the seeds both ran (same initialisation and data order), with
  its 95% Student-t interval (needs 2 shared seeds);
* the epochs and the wall time to first reach each target test accuracy,
  fixed before the runs: ``--targets 0.98,0.985`` (or ``--target``) or
  ``config.targets``. Without targets there is no time-to-target column
  (a target read off the results would favour the method that sets it). A
  run that never reaches a target is counted as not reached;
* gradient evaluations (BLAQ's active steps cost two) and total wall time.

``WORKDIR/comparison.png`` shows the training loss and the test accuracy per
epoch of every method (mean over seeds, band: sample standard deviation).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from experiments import checkpointing
from experiments import metrics as metrics_lib
from experiments import plots
from experiments import stats
from experiments import train as train_lib



def time_to_target(epochs: List[Mapping], target: float,
                   key: str = "test_accuracy"):
  """``(epoch, wall time)`` when ``key`` first reaches ``target`` (or None).

  Examples:
    >>> time_to_target([{"epoch": 1, "test_accuracy": 0.5, "wall_time": 2.0},
    ...                 {"epoch": 2, "test_accuracy": 0.9, "wall_time": 4.0}],
    ...                0.8)
    (2, 4.0)
  """
  hit = stats.first_reaching(epochs, target, key=key)
  if not hit.reached:
    return None, None
  return hit.at, hit.record["wall_time"]


def resolve_targets(config=None, targets=None) -> List[float]:
  """Targets from the command (``targets``) or else ``config.targets``.

  >>> resolve_targets(None, "0.98,0.985")
  [0.98, 0.985]
  >>> resolve_targets(None, None)
  []
  """
  if targets is not None and targets != "" and targets != []:
    return stats.parse_targets(targets)
  if config is not None and "targets" in config:
    return stats.parse_targets(config.targets)
  return []


def test_at_best_validation(epochs: List[Mapping]):
  """Test accuracy at the best-validation epoch (None without validation)."""
  try:
    return stats.select_by_validation(epochs)["test_accuracy"]
  except ValueError:  # no validation split
    return None


def _paired(runs_a: List[Mapping], runs_b: List[Mapping], value) -> str:
  """The paired difference ``a - b`` of ``value(run)`` over shared seeds."""
  def by_seed(rs):
    out = {}
    for r in rs:
      v = value(r)
      if v is not None and r["summary"].get("seed") is not None:
        out[r["summary"]["seed"]] = v
    return out
  seeds, x, y = stats.paired_by_seed(by_seed(runs_a), by_seed(runs_b))
  if len(seeds) < 2:
    return f"n/a ({len(seeds)} shared seed(s))"
  return stats.format_difference(stats.paired_difference(x, y), 100)


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
          epochs=metrics_lib.read_jsonl(root / "epochs.jsonl"),
          steps=metrics_lib.read_jsonl(root / "steps.jsonl")))
  return runs


def results_table(runs: Mapping[str, List[Mapping]],
                  targets=None) -> str:
  """The markdown table of :func:`run_all`'s results (see module doc).

  Args:
    runs: ``{method: [run]}``, each run ``{"summary", "epochs", ...}``.
    targets: target test accuracies fixed before the runs (a number, a
      sequence or ``"0.98,0.985"``); ``None``: no time-to-target columns.
  """
  targets = stats.parse_targets(targets)
  methods = list(runs)
  first = methods[0] if methods else None

  def summ(values, scale=1.0, digits=2):
    return stats.format_summary(
        stats.summarize([v for v in values if v is not None]), scale, digits)

  has_val = any(test_at_best_validation(r["epochs"]) is not None
                for rs in runs.values() for r in rs)
  head = ["method", "final test acc (%)",
          "test acc at best val epoch (%)"]
  if len(methods) > 1:
    head.append(f"final: paired diff vs {first} (points) [95% CI]")
    if has_val:
      head.append(f"at best val: paired diff vs {first} [95% CI]")
  for t in targets:
    head += [f"epochs to {100 * t:.2f}%", f"time to {100 * t:.2f}% (s)"]
  head += ["grad evals", "wall time (s)"]
  intro = ("Mean ± sample standard deviation over the seeds (n in each "
           "cell). The best epoch is chosen on the validation split")
  intro += "." if has_val else (" (none here: validation_size = 0, so no "
                                "best-epoch column).")
  if targets:
    intro += (" Target test accuracies, fixed before the runs: "
              + ", ".join(f"{100 * t:.2f}%" for t in targets) + ".")
  else:
    intro += (" No time-to-target column: pass targets fixed before the "
              "runs (--targets or config.targets).")
  lines = [intro, "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  for method, rs in runs.items():
    cells = [method,
             summ([r["summary"].get("final_test_accuracy") for r in rs], 100),
             summ([test_at_best_validation(r["epochs"]) for r in rs], 100)
             if has_val else "n/a (no validation split)"]
    if len(methods) > 1:
      cells.append("" if method == first else _paired(
          rs, runs[first], lambda r: r["summary"].get("final_test_accuracy")))
      if has_val:
        cells.append("" if method == first else _paired(
            rs, runs[first], lambda r: test_at_best_validation(r["epochs"])))
    for t in targets:
      hits = [stats.first_reaching(r["epochs"], t) for r in rs]
      cells.append(stats.format_reach(hits))
      cells.append(stats.format_reach(
          [stats.Reach(h.reached, round(h.record["wall_time"], 1) if h.reached
                       else None, None) for h in hits]))
    cells += [summ([r["summary"].get("grad_evals") for r in rs], digits=0),
              summ([r["summary"].get("wall_time") for r in rs], digits=1)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _mean_curve(records_per_seed: List[List[Mapping]], x: str, y: str):
  curves = [[r for r in recs if y in r] for recs in records_per_seed]
  n = min(len(c) for c in curves)
  if n == 0:
    return [], []
  xs = [c[x] for c in curves[0][:n]]
  ys = np.array([[c[y] for c in cur[:n]] for cur in curves], float)
  mean = ys.mean(0)
  std = ys.std(0, ddof=1) if len(ys) > 1 else np.zeros_like(mean)
  return [{x: xi, y: yi} for xi, yi in zip(xs, mean)], std


def plot_comparison(runs: Mapping[str, List[Mapping]], path: str) -> str:
  """Training loss (left) and test accuracy per epoch (right) per method."""
  plt = plots.pyplot()
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for method, rs in runs.items():
    # Per-epoch mean: a minibatch's squared hinge loss is often exactly 0.
    loss, _ = _mean_curve([r["epochs"] for r in rs], "epoch", "train_loss")
    acc, std = _mean_curve([r["epochs"] for r in rs], "epoch",
                            "test_accuracy")
    if loss:
      ax_loss.plot([r["epoch"] for r in loss],
                   [r["train_loss"] for r in loss], marker="o", ms=3,
                   label=method)
    if acc:
      x = np.array([r["epoch"] for r in acc])
      y = 100 * np.array([r["test_accuracy"] for r in acc])
      (line,) = ax_acc.plot(x, y, marker="o", ms=3, label=method)
      ax_acc.fill_between(x, y - 100 * std, y + 100 * std, alpha=0.2,
                          color=line.get_color())
  ax_loss.set(xlabel="epoch", ylabel="training loss (epoch mean)",
              yscale="log", title="Training loss (mean over seeds)")
  ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)",
             title="Test accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  return plots.save_figure(fig, path)


def compare(config, methods: Sequence[str], seeds: Sequence[int],
            workdir: str, target=None) -> str:
  """Runs, writes ``results.md``, ``results.json`` and ``comparison.png``.

  Args:
    config, methods, seeds, workdir: see the module doc.
    target: target test accuracies fixed before the runs (number, sequence
      or comma-separated string); ``None``: ``config.targets`` if set, else
      no time-to-target columns.

  Returns:
    The markdown table.
  """
  unknown = [m for m in methods if m not in train_lib.METHODS]
  if unknown:
    raise ValueError(f"Unknown method(s) {unknown}; choose from "
                     f"{list(train_lib.METHODS)}.")
  if not methods or not seeds:
    raise ValueError("Need at least one method and one seed.")
  targets = resolve_targets(config, target)  # checked before the runs
  runs = run_all(config, methods, seeds, workdir)
  table = results_table(runs, targets)
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
  checkpointing.quiet_orbax_logging()
  f = flags.FLAGS
  targets = stats.parse_targets(f.targets)
  if f.target is not None:
    targets.append(f.target)
  table = compare(f.config, _csv(f.methods), _csv(f.seeds, int), f.workdir,
                  targets or None)
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
  flags.DEFINE_float("target", None, "A target test accuracy in (0, 1], "
                     "fixed before the runs.")
  flags.DEFINE_string("targets", "", "Comma-separated target test "
                      "accuracies in (0, 1], fixed before the runs (default: "
                      "config.targets; none: no time-to-target column).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
