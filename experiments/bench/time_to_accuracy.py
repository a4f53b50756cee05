r"""Time to accuracy from logged runs: epochs, wall time, gradient evaluations.

Reads the runs of a comparison directory (the layout written by
:mod:`experiments.compare`: ``WORKDIR/<method>/seed_<s>/metrics/
epochs.jsonl``) and reports, per method and target test accuracy, when each
run first reached the target:

* the epoch,
* the logged wall time (training and the per-epoch evaluation, as measured
  during the run: only comparable between runs made on an equally loaded
  machine),
* gradient evaluations (one per step; two on BLAQ's active steps) and the
  extra forward passes of FOGZO/n-SPSA (``loss_evals``),

as the mean ± sample standard deviation over the seeds that reached it
(:mod:`experiments.stats`; how many did is shown: a run that never reaches a
target stays in the count as not reached). The targets must be fixed before
the runs and given with ``--targets`` (there is no default: a target chosen
after seeing the curves favours the method whose plateau it sits under).
The accuracy column is the test accuracy at the epoch of best validation
accuracy (never the best test accuracy), when the runs have a validation
split. It also writes ``accuracy_vs_cost_wall_time.png`` and
``..._grad_evals.png``: test accuracy of each method's first seed against
wall time and against gradient evaluations.

Usage::

  python -m experiments.bench.time_to_accuracy --workdir runs/table2 \
      --targets 0.98,0.985

Example:
  >>> import json, pathlib, tempfile
  >>> from experiments.bench.time_to_accuracy import reach
  >>> recs = [dict(epoch=1, test_accuracy=0.97, wall_time=10.0,
  ...              grad_evals=500, loss_evals=0),
  ...         dict(epoch=2, test_accuracy=0.99, wall_time=20.0,
  ...              grad_evals=1000, loss_evals=0)]
  >>> reach(recs, 0.98)["grad_evals"]
  1000
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from experiments import plots
from experiments import stats
from experiments import metrics as metrics_lib
from experiments.bench import common

COST_KEYS = ("epoch", "wall_time", "grad_evals", "loss_evals")


def reach(epochs: Sequence[Mapping[str, Any]], target: float,
          key: str = "test_accuracy") -> Optional[Dict[str, Any]]:
  """The cost fields of the first epoch record with ``key >= target``."""
  hit = stats.first_reaching(epochs, target, key=key)
  if not hit.reached:
    return None
  return {k: hit.record.get(k, 0) for k in COST_KEYS}


def load_runs(workdir: str, methods: Optional[Sequence[str]] = None
              ) -> Dict[str, List[List[Dict[str, Any]]]]:
  """``{method: [epoch records of each seed]}`` found under ``workdir``."""
  root = pathlib.Path(workdir)
  found = sorted(p.name for p in root.iterdir() if p.is_dir())
  runs = {}
  for method in (methods or found):
    seeds = sorted((root / method).glob("seed_*"))
    recs = [metrics_lib.read_jsonl(s / "metrics" / "epochs.jsonl")
            for s in seeds]
    recs = [r for r in recs if r]
    if recs:
      runs[method] = recs
  if not runs:
    raise FileNotFoundError(f"No runs (<method>/seed_*/metrics/epochs.jsonl) "
                            f"under {workdir}.")
  return runs


def table(runs: Mapping[str, List[List[Mapping]]],
          targets: Sequence[float]) -> List[Dict[str, Any]]:
  """One row per method and target.

  Each cost field ``k`` is the mean over the runs that reached the target
  (``None`` if none did), with ``k + "_std"`` its sample standard deviation
  (``None`` under 2 runs); ``reached``/``runs`` count them. ``best`` is the
  mean test accuracy at the best-validation epoch (``None`` without a
  validation split).
  """
  rows = []
  for method, per_seed in runs.items():
    best = []
    for recs in per_seed:
      try:
        best.append(stats.select_by_validation(recs)["test_accuracy"])
      except ValueError:  # no validation split: no best epoch
        pass
    best = [b for b in best if b is not None]
    for target in targets:
      hits = [reach(recs, target) for recs in per_seed]
      ok = [h for h in hits if h is not None]
      row = dict(method=method, target=target, reached=len(ok),
                 runs=len(hits),
                 best=float(np.mean(best)) if best else None,
                 epochs_run=float(np.mean([len(r) for r in per_seed])))
      for k in COST_KEYS:
        s = stats.summarize([h[k] for h in ok])
        row[k], row[k + "_std"] = s.mean, s.std
      rows.append(row)
  return rows


def _cell(x, fmt, std=None):
  if x is None:
    return "-"
  return format(x, fmt) + ("" if std is None else " ± " + format(std, fmt))


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True,
                 help="comparison directories (experiments.compare), "
                 "comma-separated")
  p.add_argument("--methods", default="",
                 help="comma-separated (default: all found)")
  p.add_argument("--targets", default="",
                 help="comma-separated test accuracies in (0, 1], fixed "
                 "before the runs (required)")
  p.add_argument("--plot", default=None,
                 help="PNG to write (default WORKDIR/accuracy_vs_cost.png)")
  args = p.parse_args(argv)
  try:
    targets = stats.parse_targets(args.targets)
  except ValueError as e:
    raise SystemExit(f"--targets: {e}") from e
  methods = [m for m in args.methods.split(",") if m] or None
  workdirs = [w for w in args.workdir.split(",") if w]
  runs = {}
  for w in workdirs:
    for method, recs in load_runs(w, methods if len(workdirs) == 1 else None
                                  ).items():
      if method in runs:
        raise SystemExit(f"Method {method!r} is in more than one of "
                         f"{workdirs}; pass --methods or one workdir each.")
      if methods is None or method in methods:
        runs[method] = recs
  if not runs:
    raise SystemExit(f"None of the methods {methods} found in {workdirs}.")
  if not targets:
    raise SystemExit("--targets is required: give the target test "
                     "accuracies fixed before the runs, e.g. --targets 0.98.")
  rows = table(runs, targets)
  print("Mean ± sample standard deviation over the runs that reached the "
        "target (reached: how many of all runs did).\n")
  print(common.markdown_table(
      ["method", "target (%)", "reached", "epochs", "wall time (s)",
       "grad evals", "extra fwd passes", "test acc at best val epoch (%)",
       "epochs run"],
      [[r["method"], f"{100 * r['target']:.2f}",
        f"{r['reached']}/{r['runs']}",
        _cell(r["epoch"], ".1f", r["epoch_std"]),
        _cell(r["wall_time"], ".0f", r["wall_time_std"]),
        _cell(r["grad_evals"], ".0f", r["grad_evals_std"]),
        _cell(r["loss_evals"], ".0f", r["loss_evals_std"]),
        _cell(None if r["best"] is None else 100 * r["best"], ".2f"),
        f"{r['epochs_run']:.0f}"] for r in rows]))
  first = {m: recs[0] for m, recs in runs.items()}  # seed curves: the first
  out = args.plot or str(pathlib.Path(workdirs[0]) / "accuracy_vs_cost.png")
  stem = out[:-4] if out.endswith(".png") else out
  for x in ("wall_time", "grad_evals"):
    plots.plot_test_accuracy(first, f"{stem}_{x}.png", x=x)
  print(f"\nWritten: {stem}_wall_time.png, {stem}_grad_evals.png")
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
