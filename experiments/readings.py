r"""Which reading of BLAQ's Algorithm 1 to use: readings against each other.

Reads the cell files of the regime map (:mod:`experiments.regime`) and, per
dataset, bit width and learning rate, compares the readings pairwise on the
same seeds: the paired difference of the test accuracy at the
validation-selected epoch, with its 95% t-interval
(:mod:`experiments.stats`). Writes ``DIR/readings.md``.

  python -m experiments.readings --dir experiments/results/regime
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
from typing import List, Optional, Sequence

from experiments import regime
from experiments import stats

READINGS = ("lookahead", "moments", "gradients")


def comparison_rows(records) -> List[dict]:
  """One row per (dataset, bits, lr, pair of readings)."""
  cells = {(r["dataset"], r["bits"], r["lr"], r.get("blend")): r
           for r in records}
  rows = []
  for dataset, bits, lr in sorted({k[:3] for k in cells}):
    for x, y in itertools.combinations(READINGS, 2):
      if (dataset, bits, lr, x) not in cells or (
          dataset, bits, lr, y) not in cells:
        continue
      ax = regime.selected_test_accuracy(cells[dataset, bits, lr, x])
      ay = regime.selected_test_accuracy(cells[dataset, bits, lr, y])
      _, xs, ys = stats.paired_by_seed(ax, ay)
      d = stats.paired_difference(xs, ys)
      rows.append(dict(dataset=dataset, bits=bits, lr=lr, pair=(x, y), d=d))
  return rows


def verdict(d) -> str:
  if d.low is not None and d.low > 0:
    return "first better"
  if d.high is not None and d.high < 0:
    return "second better"
  return "no"


def report(directory, command: str = "") -> str:
  """The markdown of ``readings.md`` (also written there)."""
  directory = pathlib.Path(directory)
  rows = comparison_rows(regime.load_cells(directory))
  lines = [
      "# BLAQ's readings against each other on the regime map", "",
      f"Written by `{command}` from the cell files in this folder "
      "(see summary.md for how they were made). Test accuracy at the epoch "
      "of best validation accuracy, paired by seed; 95% Student-t interval "
      "of the difference (first minus second), in points.", "",
      "| pairing | cells where the first is better | cells where the "
      "second is better | cells without a difference |",
      "|---|---|---|---|"]
  for pair in itertools.combinations(READINGS, 2):
    got = [verdict(r["d"]) for r in rows if r["pair"] == pair]
    lines.append(f"| {pair[0]} - {pair[1]} | {got.count('first better')} "
                 f"| {got.count('second better')} | {got.count('no')} |")
  lines += ["", "| dataset | bits | lr | first - second | n | mean, sd "
            "(points) | 95% t-interval | excludes 0 |",
            "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    d = r["d"]
    lines.append(
        f"| {r['dataset']} | {r['bits']} | {r['lr']} | {r['pair'][0]} - "
        f"{r['pair'][1]} | {d.n} | {100 * d.mean:+.2f}, {100 * d.std:.2f} | "
        f"[{100 * d.low:+.2f}, {100 * d.high:+.2f}] | {verdict(d)} |")
  text = "\n".join(lines) + "\n"
  (directory / "readings.md").write_text(text)
  return text


def main(argv: Optional[Sequence[str]] = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default="experiments/results/regime")
  args = parser.parse_args(argv)
  command = "python -m experiments.readings --dir " + args.dir
  text = report(args.dir, command)
  print(text)
  return text


if __name__ == "__main__":
  main()
