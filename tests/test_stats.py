"""Tests of experiments.stats and of its use by compare and time_to_accuracy:
tiny inputs with answers computed by hand."""

import json
import math

import pytest

from experiments import compare as compare_lib
from experiments import stats
from experiments.bench import time_to_accuracy

# Student-t 0.975 quantiles from a printed t-table (df: value).
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 10: 2.228, 30: 2.042}


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_the_table(df):
  assert stats.t_quantile(0.975, df) == pytest.approx(T_TABLE[df], abs=1e-3)


def test_paired_interval_against_a_hand_computed_value():
  x = [1.2, 0.4, 0.9, 1.5]
  y = [1.0, 0.1, 0.5, 0.6]
  # d = (0.2, 0.3, 0.4, 0.9): mean 0.45, squared deviations
  # 0.0625 + 0.0225 + 0.0025 + 0.2025 = 0.29, s^2 = 0.29 / 3,
  # half-width t_{0.975,3} s / sqrt(4).
  s = math.sqrt(0.29 / 3)
  half = T_TABLE[3] * s / 2
  d = stats.paired_difference(x, y)
  assert d.n == 4
  assert d.mean == pytest.approx(0.45)
  assert d.std == pytest.approx(s)
  assert d.low == pytest.approx(0.45 - half, abs=1e-3)
  assert d.high == pytest.approx(0.45 + half, abs=1e-3)
  assert d.low < 0 < d.high  # four pairs this noisy cannot tell
  assert stats.format_difference(d) == "+0.45 [-0.04, +0.94] (n = 4)"


def test_paired_difference_rejects_unpaired_lengths():
  with pytest.raises(ValueError, match="3 values against 2"):
    stats.paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])


def test_paired_difference_rejects_a_single_pair():
  with pytest.raises(ValueError, match="at least 2 pairs, got 1"):
    stats.paired_difference([1.0], [0.5])


def test_paired_difference_rejects_nan():
  with pytest.raises(ValueError, match="non-finite"):
    stats.paired_difference([1.0, float("nan")], [0.5, 0.5])


def test_summary_uses_the_sample_standard_deviation_and_says_n():
  s = stats.summarize([0.98, 0.99])
  # sample sd of two values: |a - b| / sqrt(2), not half the range.
  assert s == stats.Summary(2, pytest.approx(0.985),
                            pytest.approx(0.01 / math.sqrt(2)))
  assert stats.format_summary(s, 100) == "98.50 ± 0.71 (n = 2)"
  one = stats.format_summary(stats.summarize([0.98]), 100)
  assert one == "98.00 (n = 1)" and "±" not in one
  assert stats.format_summary(stats.summarize([])) == "-"


def test_best_epoch_is_chosen_on_validation_not_test():
  recs = [dict(epoch=1, validation_accuracy=0.90, test_accuracy=0.93),
          dict(epoch=2, validation_accuracy=0.95, test_accuracy=0.91),
          dict(epoch=3, validation_accuracy=0.95, test_accuracy=0.92),
          dict(epoch=4, validation_accuracy=0.94, test_accuracy=0.96)]
  best = stats.select_by_validation(recs)
  # Epochs 2 and 3 tie on validation: the earlier; its test accuracy, not
  # the best test accuracy (0.96 at epoch 4).
  assert best == {"epoch": 2, "validation_accuracy": 0.95,
                  "test_accuracy": 0.91}


def test_best_epoch_without_validation_split_is_an_error():
  with pytest.raises(ValueError, match="no record has 'validation_accuracy'"):
    stats.select_by_validation([dict(epoch=1, test_accuracy=0.9)])


def test_target_reached_at_epoch_k_and_not_reached():
  recs = [dict(epoch=1, test_accuracy=0.97), dict(epoch=2, test_accuracy=0.98),
          dict(epoch=3, test_accuracy=0.979), dict(epoch=4, test_accuracy=0.99)]
  hit = stats.first_reaching(recs, 0.98)
  assert hit.reached and hit.at == 2 and hit.record is recs[1]
  assert stats.first_reaching(recs, 0.995) == stats.Reach(False, None, None)
  loss = [dict(step=10, loss=2.0), dict(step=20, loss=0.5)]
  assert stats.first_reaching(loss, 1.0, key="loss", x="step",
                              higher_is_better=False).at == 20
  # A run that misses stays in the count.
  hits = [stats.first_reaching(recs, 0.985),
          stats.first_reaching(recs[:3], 0.985)]
  assert stats.format_reach(hits) == "not reached (1/2 runs; reached: 4)"
  assert stats.format_reach(hits[:1] * 2) == "4.0 ± 0.0 (n = 2)"


def test_targets_out_of_range_are_rejected():
  with pytest.raises(ValueError, match=r"in \(0, 1\], got \[98.0\]"):
    stats.parse_targets("98")


def _run(seed, accs, vals=None, final=None):
  epochs = [dict(epoch=i + 1, test_accuracy=a, wall_time=10.0 * (i + 1))
            for i, a in enumerate(accs)]
  if vals is not None:
    for r, v in zip(epochs, vals):
      r["validation_accuracy"] = v
  return dict(summary=dict(seed=seed, final_test_accuracy=final or accs[-1],
                           grad_evals=100, wall_time=10.0 * len(accs)),
              epochs=epochs, steps=[])


def test_compare_table_pairs_seeds_and_needs_fixed_targets():
  runs = {
      "laq": [_run(0, [0.90, 0.95], [0.91, 0.94]),
              _run(1, [0.92, 0.93], [0.93, 0.92]),
              _run(2, [0.91, 0.96], [0.90, 0.95])],
      "blaq": [_run(0, [0.93, 0.96], [0.92, 0.96]),
               _run(1, [0.90, 0.95], [0.92, 0.91]),
               _run(2, [0.94, 0.97], [0.95, 0.93])],
  }
  table = compare_lib.results_table(runs)
  assert "epochs to" not in table and "No time-to-target column" in table
  blaq = next(l for l in table.splitlines() if l.startswith("| blaq"))
  cells = [c.strip() for c in blaq.strip("|").split("|")]
  # Final: blaq - laq per seed = (0.01, 0.02, 0.01).
  final = stats.paired_difference([0.96, 0.95, 0.97], [0.95, 0.93, 0.96])
  assert cells[3] == stats.format_difference(final, 100)
  # At the best validation epoch: laq (0.95, 0.92, 0.96), blaq (0.96, 0.90,
  # 0.93) (seed 2 of blaq peaks on validation at epoch 1).
  at_val = stats.paired_difference([0.96, 0.90, 0.94], [0.95, 0.92, 0.96])
  assert cells[4] == stats.format_difference(at_val, 100)
  assert cells[2] == stats.format_summary(
      stats.summarize([0.96, 0.90, 0.94]), 100)
  with_target = compare_lib.results_table(runs, [0.955])
  laq = next(l for l in with_target.splitlines() if l.startswith("| laq"))
  assert "not reached (2/3 runs; reached: 2)" in laq


def test_compare_reads_targets_from_the_command_or_the_config():
  import ml_collections
  config = ml_collections.ConfigDict({"targets": "0.98"})
  assert compare_lib.resolve_targets(config, None) == [0.98]
  assert compare_lib.resolve_targets(config, [0.99]) == [0.99]
  assert compare_lib.resolve_targets(ml_collections.ConfigDict(), None) == []


def _write_runs(root, curves):
  for (method, seed), accs in curves.items():
    metrics = root / method / f"seed_{seed}" / "metrics"
    metrics.mkdir(parents=True)
    metrics.joinpath("epochs.jsonl").write_text("".join(
        json.dumps(dict(epoch=e + 1, test_accuracy=a, wall_time=1.0 + e,
                        grad_evals=10 * (e + 1), loss_evals=0)) + "\n"
        for e, a in enumerate(accs)))


def test_time_to_accuracy_counts_misses_and_reports_sample_sd(tmp_path):
  _write_runs(tmp_path, {("laq", 0): [0.95, 0.98, 0.99],
                         ("laq", 1): [0.98, 0.985, 0.99],
                         ("laq", 2): [0.95, 0.96, 0.97]})
  (row,) = time_to_accuracy.main(["--workdir", str(tmp_path),
                                  "--targets", "0.98"])
  assert (row["reached"], row["runs"]) == (2, 3)
  assert row["epoch"] == pytest.approx(1.5)  # epochs 2 and 1
  assert row["epoch_std"] == pytest.approx(math.sqrt(0.5))
  assert row["best"] is None  # no validation split: no best epoch


def test_time_to_accuracy_requires_targets(tmp_path):
  _write_runs(tmp_path, {("laq", 0): [0.95]})
  with pytest.raises(SystemExit, match="--targets is required"):
    time_to_accuracy.main(["--workdir", str(tmp_path)])
