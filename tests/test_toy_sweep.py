"""Tests of experiments.toy_sweep: the step multiplier, the brute-force best
level-set point, the measures, and the driver on a 2-cell grid."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import plots
from experiments import toy_sweep


def test_best_fig1_point_by_hand():
  # 1 bit, beta = (+1, -1): alpha = (10 t1 - 2 t2) / 12 with the toy's
  # constants t = (0.054, -0.055) as float32, as the transforms see them.
  t1, t2 = float(np.float32(0.054)), float(np.float32(-0.055))
  alpha = (10 * t1 - 2 * t2) / 12
  hand = 5 * (alpha - t1) ** 2 + (-alpha - t2) ** 2
  toy = toy_sweep.make_toy("fig1")
  assert toy_sweep.best_level_set_loss(toy, 1) == pytest.approx(hand, rel=1e-9)
  # 2 bits can only do as well or better.
  assert toy_sweep.best_level_set_loss(toy, 2) <= hand + 1e-15


def test_best_abs32_point_is_the_origin():
  assert toy_sweep.best_level_set_loss(toy_sweep.make_toy("abs32"), 1) < 1e-9


@pytest.mark.parametrize("s", [0.5, 1.0, 2.5])
def test_laq_step_is_s_times_the_newton_step(s):
  toy = toy_sweep.make_toy("fig1")
  lat, quant, _ = toy_sweep.toy_trajectories(toy, "laq", 1, 0.0, [s], [1.0],
                                             steps=1)
  w0, q0 = lat[0, 0, 0], quant[0, 0, 0]
  # D-weighted 1-bit projection at init (D = 1): alpha = mean |w0|.
  np.testing.assert_allclose(q0, 0.055 * np.array([-1.0, 1.0]), rtol=1e-6)
  newton = (q0 - np.array([0.054, -0.055]))  # H^-1 grad at q0
  np.testing.assert_allclose(lat[0, 0, 1], w0 - s * newton, rtol=1e-5)


def test_laq_with_newton_curvature_oscillates_on_abs32():
  # One weight, f = |w|^(3/2): w1 = q0 - 2 q0 = -q0 (METHOD.md, toy facts).
  c = jnp.asarray([1.0])
  toy = toy_sweep.Toy(
      "abs32_1d", lambda w: jnp.sum(c * jnp.abs(w) ** 1.5),
      lambda w: 0.75 * c / jnp.sqrt(jnp.maximum(jnp.abs(w), 1e-12)),
      np.asarray([0.3], np.float32))
  lat, _, _ = toy_sweep.toy_trajectories(toy, "laq", 1, 0.0, [1.0], [1.0],
                                         steps=4)
  np.testing.assert_allclose(lat[0, 0, :, 0], [0.3, -0.3, 0.3, -0.3, 0.3],
                             rtol=1e-5)
  assert toy_sweep.turning_points(lat[0, 0]) == 3.0


def test_readings_coincide_without_momentum():
  toy = toy_sweep.make_toy("quad10")
  paths = [toy_sweep.toy_trajectories(toy, m, 1, 0.0, [1.5], [0.6], steps=10)
           for m in toy_sweep.READINGS]
  for other in paths[1:]:
    np.testing.assert_allclose(other[0], paths[0][0], rtol=1e-5, atol=1e-7)


def test_measures_of_a_hand_made_path():
  f = np.array([1.0, 0.5, 0.0005, 0.002, 0.0001, 0.0])
  latent = np.array([[0.0], [1.0], [0.5], [0.7], [0.6], [0.6]])
  codes = np.array([[0], [1], [1], [0], [0], [0]])
  m = toy_sweep.toy_measures(f, 0.0, latent, codes, tol=1e-3)
  assert m["steps_to_tol"] == 2 and m["steps_to_stay"] == 4
  assert m["in_tol_after"] == pytest.approx(3 / 4)
  assert m["turning_points"] == 3.0  # +, -, +, - then at rest
  assert m["flips"] == 2.0
  assert not m["diverged"]
  blown = toy_sweep.toy_measures(np.array([1.0, np.inf]), 0.0,
                                 np.array([[0.0], [np.nan]]),
                                 np.array([[0], [1]]), 1e-3)
  assert blown["diverged"] and blown["steps_to_tol"] is None


def test_driver_on_a_two_cell_grid_is_resumable(tmp_path):
  kw = dict(problems=["fig1"], multipliers=[1.0], a_values=[0.6], b1s=[0.0],
            bits=[1], steps=30, quiet=True)
  rows = toy_sweep.run_sweep(str(tmp_path), methods=["laq", "moments"], **kw)
  assert [(r["method"], r["a"]) for r in rows] == [("laq", None),
                                                   ("moments", 0.6)]
  laq, blaq = rows
  # At the Newton step LAQ is within 1e-3 after one step (see the test of
  # the step above) and stays there; BLAQ's blend takes it more steps.
  assert laq["steps_to_tol"] == 1 and laq["steps_to_stay"] == 1
  assert blaq["steps_to_stay"] > 1 and not blaq["diverged"]
  path = tmp_path / "runs_fig1.jsonl"
  lines = path.read_text().splitlines()
  assert [json.loads(l)["method"] for l in lines] == ["laq", "moments"]
  # Rerun: nothing recomputed; a new method appends its cell only.
  toy_sweep.run_sweep(str(tmp_path), methods=["laq", "moments"], **kw)
  assert path.read_text().splitlines() == lines
  toy_sweep.run_sweep(str(tmp_path), methods=["lookahead"], **kw)
  assert len(path.read_text().splitlines()) == 3
  summary = (tmp_path / "summary.md").read_text()
  assert toy_sweep.COMMAND in summary and "| fig1 | moments |" in summary


def test_driver_rejects_an_unknown_problem(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown problem\(s\) \['nope'\]"):
    toy_sweep.run_sweep(str(tmp_path), problems=["nope"])


def test_softmax_cell_on_a_few_steps(shared_data_dir, tmp_path):
  rows = toy_sweep.run_sweep(
      str(tmp_path), problems=["mnist"], methods=["laq"], lr_multipliers=[1.0],
      b1s=[0.9], bits=[1], seeds=[0, 1], steps=20, data_dir=shared_data_dir,
      quiet=True)
  assert [r["seed"] for r in rows] == [0, 1]
  for r in rows:
    assert r["lr"] == pytest.approx(toy_sweep.BASE_LR)
    assert r["best_validation_step"] in (0, 10, 20)
    assert 0.1 < r["test_accuracy_at_best_validation"] <= 1
    assert r["steps_to_target"] in (None, 0, 10, 20)
  assert rows[0]["final_train_loss"] != rows[1]["final_train_loss"]
  assert (tmp_path / "reference_mnist.json").exists()


def test_fig1_rows_at_newton_and_zigzag_steps(tmp_path):
  out = plots.plot_fig1(str(tmp_path / "fig1.png"), [1.0, 1.9], steps=40)
  newton, zig = out[1.0], out[1.9]
  # At the Newton step LAQ gets there first; at 1.9 it zig-zags and BLAQ
  # (a = 0.6, above the threshold 2 / 1.6) gets there first.
  assert newton["laq"]["steps_to_stay"] < newton["blaq"]["steps_to_stay"]
  assert zig["blaq"]["steps_to_stay"] < zig["laq"]["steps_to_stay"]
  assert zig["laq"]["turning_points"] > 10 * zig["blaq"]["turning_points"]
  assert "above Theorem 2's threshold" in zig["caption"]
  assert (tmp_path / "fig1.png").stat().st_size > 0


def test_blaq_takes_the_trial_curvature_at_the_trial_point():
  # One weight, f = |w - 0.1|^(3/2), 1 bit (q = w exactly), b1 = 0, s = 1/4,
  # a = 0.6, from w0 = 0.5. By hand, with d = |w - 0.1|:
  #   g = 1.5 sqrt(d) sign(w - 0.1), H = 0.75 / sqrt(d), D = H / s.
  #   q0 = 0.5: g0 = 1.5 sqrt(0.4), D0 = 4 * 0.75 / sqrt(0.4);
  #   w* = 0.5 - s g0 / H0 = 0.5 - 0.25 * 2 * 0.4 = 0.3 = q*:
  #   g* = 1.5 sqrt(0.2), D* = 4 * 0.75 / sqrt(0.2);
  #   w1 = w0 - (a g0 + (1 - a) g*) / (a D0 + (1 - a) D*).
  g0, gs = 1.5 * np.sqrt(0.4), 1.5 * np.sqrt(0.2)
  d0, ds = 3.0 / np.sqrt(0.4), 3.0 / np.sqrt(0.2)
  w1 = 0.5 - (0.6 * g0 + 0.4 * gs) / (0.6 * d0 + 0.4 * ds)  # 0.348528
  toy = toy_sweep.Toy(
      "kink", lambda w: jnp.sum(jnp.abs(w - 0.1) ** 1.5),
      lambda w: 0.75 / jnp.sqrt(jnp.maximum(jnp.abs(w - 0.1), 1e-12)),
      np.asarray([0.5], np.float32))
  lat, _, _ = toy_sweep.toy_trajectories(toy, "moments", 1, 0.0, [0.25],
                                         [0.6], steps=1)
  assert lat[0, 0, 1, 0] == pytest.approx(w1, rel=1e-5)
