"""experiments.readings on three real cells of the regime map."""

import pathlib
import shutil

import numpy as np
import pytest

from experiments import readings
from experiments import regime

CELLS = pathlib.Path(__file__).resolve().parents[1] / (
    "experiments/results/regime")


def test_readings_pairwise_on_real_cells(tmp_path):
  for blend in readings.READINGS:
    shutil.copy(CELLS / f"fashion_mnist_b1_lr0.045_blaq_{blend}.json",
                tmp_path)
  text = readings.report(tmp_path, "cmd")
  rows = readings.comparison_rows(regime.load_cells(tmp_path))
  assert [r["pair"] for r in rows] == [("lookahead", "moments"),
                                       ("lookahead", "gradients"),
                                       ("moments", "gradients")]
  # By hand: the mean and t-interval of the per-seed differences.
  acc = {b: regime.selected_test_accuracy(regime.load_cells(tmp_path)[i])
         for i, b in enumerate(r["blend"] for r in regime.load_cells(
             tmp_path))}
  diff = np.array([acc["lookahead"][s] - acc["moments"][s]
                   for s in sorted(acc["lookahead"])])
  half = 2.3646 * diff.std(ddof=1) / np.sqrt(diff.size)  # t(0.975, 7)
  d = rows[0]["d"]
  assert d.n == 8 and d.mean == pytest.approx(diff.mean())
  assert d.low == pytest.approx(diff.mean() - half, abs=1e-4)
  assert readings.verdict(d) == ("first better" if d.low > 0 else "no")
  assert (tmp_path / "readings.md").read_text() == text
  assert "| lookahead - moments |" in text
