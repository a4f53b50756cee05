"""Tests of the training application (experiments.train, compare, zigzag,
plots). Runs use an MNIST subset and a narrow MLP so each takes seconds.

Checkpoint integrity is tested in test_checkpointing.py, the command line in
test_cli.py."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
import pytest

import blaq_jax
from blaq_jax import methods as methods_lib
from experiments import checkpointing
from experiments import compare as compare_lib
from experiments import input_pipeline
from experiments import metrics as metrics_lib
from experiments import plots
from experiments import train as train_lib
from experiments import zigzag
from experiments.configs import quick

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_dir, **overrides):
  c = quick.get_config()
  c.data_dir = str(data_dir)
  c.model_options.hidden = (32, 32)
  c.train_size = 1000
  c.validation_size = 200
  c.test_size = 500
  c.num_epochs = 1
  c.num_devices = 1
  c.progress_bar = False
  c.write_plots = False
  c.tensorboard = False
  c.num_tracked = 8
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _epochs(workdir):
  return metrics_lib.read_jsonl(pathlib.Path(workdir) / "metrics" /
                              "epochs.jsonl")


def _without_timing(records):
  return [{k: v for k, v in r.items() if k not in metrics_lib.TIMING_KEYS}
          for r in records]


def test_quick_one_epoch_two_methods_compare(shared_data_dir, tmp_path):
  config = tiny_config(shared_data_dir, blaq_period_epochs=1,
                       write_plots=True)
  table = compare_lib.compare(config, ["laq", "blaq"], [0], str(tmp_path))
  results = json.loads((tmp_path / "results.json").read_text())
  steps = 1000 // 100
  for method, evals in (("laq", steps), ("blaq", 2 * steps)):
    (summary,) = results[method]
    assert summary["epochs"] == 1 and summary["step"] == steps
    assert summary["grad_evals"] == evals  # BLAQ active every step: 2 each
    assert summary["final_test_accuracy"] > 0.3  # chance is 0.1
    run = tmp_path / method / "seed_0"
    for name in ("train_loss", "test_accuracy", "zigzag"):
      assert (run / "plots" / f"{name}.png").stat().st_size > 0
    steps_log = metrics_lib.read_jsonl(run / "metrics" / "steps.jsonl")
    assert [r["step"] for r in steps_log] == list(range(5, steps + 1, 5))
    assert all(r["trial_active"] == (method == "blaq") for r in steps_log)
  assert "| laq |" in table and "| blaq |" in table
  assert (tmp_path / "results.md").read_text().strip() == table
  assert (tmp_path / "comparison.png").stat().st_size > 0


def test_resume_gives_the_same_run(shared_data_dir, tmp_path):
  # m = 2: BLAQ's two-stage epochs and LAQ epochs both cross the restart.
  config = tiny_config(shared_data_dir, method="blaq", num_epochs=3,
                       blaq_period_epochs=2)
  straight = train_lib.train_and_evaluate(config, str(tmp_path / "a"))
  config.stop_after_epochs = 1  # "interrupted" after epoch 1 ...
  first = train_lib.train_and_evaluate(config, str(tmp_path / "b"))
  assert first["epochs"] == 1
  config.stop_after_epochs = 0  # ... and resumed to the end.
  resumed = train_lib.train_and_evaluate(config, str(tmp_path / "b"))
  assert _without_timing(_epochs(tmp_path / "b")) == _without_timing(
      _epochs(tmp_path / "a"))
  for key in ("final_test_accuracy", "final_train_loss", "grad_evals",
              "zigzag", "step"):
    assert resumed[key] == straight[key], key
  for e in (1, 2, 3):
    a = np.load(tmp_path / "a" / "zigzag" / f"epoch_{e:04d}.npz")
    b = np.load(tmp_path / "b" / "zigzag" / f"epoch_{e:04d}.npz")
    np.testing.assert_array_equal(a["latent"], b["latent"])
  _, state_a, _ = train_lib.restore_latest(str(tmp_path / "a"), config)
  _, state_b, _ = train_lib.restore_latest(str(tmp_path / "b"), config)
  chex.assert_trees_all_equal(state_a, state_b)


def test_extending_num_epochs_gives_the_longer_run(shared_data_dir,
                                                   tmp_path):
  # A 1-epoch BLAQ run continued to 3 epochs is the 3-epoch run (the lr
  # decays per epoch, BLAQ is active one epoch in 2, shuffles are per epoch).
  config = tiny_config(shared_data_dir, method="blaq", num_epochs=3,
                       blaq_period_epochs=2, lr_decay_every_epochs=1)
  straight = train_lib.train_and_evaluate(config, str(tmp_path / "a"))
  config.num_epochs = 1
  train_lib.train_and_evaluate(config, str(tmp_path / "b"))
  config.num_epochs = 3
  extended = train_lib.train_and_evaluate(config, str(tmp_path / "b"))
  assert _without_timing(_epochs(tmp_path / "b")) == _without_timing(
      _epochs(tmp_path / "a"))
  assert extended["final_test_accuracy"] == straight["final_test_accuracy"]
  saved = json.loads((tmp_path / "b" / "config.json").read_text())
  assert saved == json.loads((tmp_path / "a" / "config.json").read_text())
  # Shortening below the epochs done is refused and changes nothing.
  before = {p: p.stat().st_mtime_ns for p in (tmp_path / "b").rglob("*")}
  config.num_epochs = 2
  with pytest.raises(checkpointing.ConfigMismatchError,
                     match="holds 3 epochs; num_epochs=2 would shorten"):
    train_lib.train_and_evaluate(config, str(tmp_path / "b"))
  assert {p: p.stat().st_mtime_ns
          for p in (tmp_path / "b").rglob("*")} == before


def test_length_dependent_method_cannot_be_extended():
  # FOGZO's beta decays over the run's total steps: its length is identity.
  def differences(saved, current):
    fixed = train_lib.run_length_is_identity(
        ml_collections.ConfigDict(current))
    return checkpointing.config_differences(saved, current,
                                            fixed_length=fixed)
  saved = {"method": "fogzo", "num_epochs": 1, "seed": 0}
  assert differences(saved, dict(saved, num_epochs=2)) == [
      "num_epochs: 1 (saved) vs 2 (now)"]
  saved["method"] = "laq"
  assert differences(saved, dict(saved, num_epochs=2)) == []


def test_other_config_is_refused_and_workdir_untouched(shared_data_dir,
                                                       tmp_path):
  config = tiny_config(shared_data_dir, method="laq")
  train_lib.train_and_evaluate(config, str(tmp_path))
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  other = tiny_config(shared_data_dir, method="blaq", bits=2)
  with pytest.raises(checkpointing.ConfigMismatchError) as err:
    train_lib.train_and_evaluate(other, str(tmp_path))
  assert "method: 'laq' (saved) vs 'blaq' (now)" in str(err.value)
  assert "bits: 1 (saved) vs 2 (now)" in str(err.value)
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
  # Run-control fields may differ: this resumes (nothing left to do).
  same = tiny_config(shared_data_dir, method="laq", log_every_steps=3,
                     eval_batch_size=128)
  assert train_lib.train_and_evaluate(same, str(tmp_path))["epochs"] == 1


def test_batch_not_divisible_by_devices_is_a_clear_error(shared_data_dir):
  assert jax.device_count() == 8  # the root conftest's fake CPU devices
  config = tiny_config(shared_data_dir, num_devices=0, batch_size=100)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    input_pipeline.make_mesh(config)
  config.batch_size = 96
  assert input_pipeline.make_mesh(config).devices.size == 8


def test_data_parallel_matches_one_device(shared_data_dir, tmp_path):
  runs = {}
  for n in (1, 4):
    config = tiny_config(shared_data_dir, method="laq", num_devices=n,
                         num_tracked=0)
    setup = train_lib.Setup(config)
    state = setup.place(setup.init_state)
    x, y = setup.splits["train"]
    batch = {"image": x[:100], "label": y[:100]}
    losses = []
    for _ in range(3):
      state, m = setup.jit_train_step(
          state, input_pipeline.global_batch(setup.mesh, batch))
      losses.append(float(m["loss"]))
    kernel = state["params"]["dense"][0]["kernel"]
    assert len(kernel.sharding.device_set) == n  # replicated over the mesh
    runs[n] = (losses, jax.device_get(state["params"]))
  np.testing.assert_allclose(runs[1][0], runs[4][0], rtol=1e-5)
  chex.assert_trees_all_close(runs[1][1], runs[4][1], atol=1e-5)


@pytest.mark.parametrize("method,bits", [
    ("fp", 1), ("bc", 1), ("bwn", 1), ("twn", 2), ("ste", 2), ("laq", 2),
    ("blaq", 1), ("fogzo", 1), ("n_spsa", 1)])
def test_every_method_trains_on_its_level_set(shared_data_dir, method, bits):
  config = tiny_config(shared_data_dir, method=method, bits=bits,
                       train_size=300, num_tracked=0)
  setup = train_lib.Setup(config)
  state = setup.place(setup.init_state)
  x, y = setup.splits["train"]
  for i in range(3):
    batch = {"image": x[100 * i:100 * (i + 1)],
             "label": y[100 * i:100 * (i + 1)]}
    state, m = setup.jit_train_step(
        state, input_pipeline.global_batch(setup.mesh, batch))
    assert np.isfinite(float(m["loss"]))
  kernel = np.asarray(state["params"]["dense"][0]["kernel"])
  levels = np.unique(np.abs(kernel))
  if method == "fp":
    assert levels.size > 100
  else:  # one scale per tensor: at most 2^(bits-1) magnitudes (+ zero), up
    # to the ulp of ``p + (q - p)`` in apply_updates.
    levels = levels[levels > 0]
    distinct = levels[np.concatenate(
        [[True], np.diff(levels) > 2 * np.spacing(levels[1:])])]
    assert distinct.size <= 2 ** (bits - 1), levels
  if method in ("fogzo", "n_spsa"):
    assert int(m["loss_evals"]) == 2 * config.fogzo.n


def test_train_step_reads_the_cost_from_the_state(shared_data_dir):
  # The step knows no method: a plain Optax transform costs one gradient,
  # BLAQ's active step two, FOGZO with n = 3 directions 2n = 6 extra losses.
  config = tiny_config(shared_data_dir, method="laq", train_size=200,
                       num_tracked=0)
  setup = train_lib.Setup(config)
  x, y = setup.splits["train"]
  batch = {"image": x[:100], "label": y[:100]}
  params = setup.init_state["params"]
  for tx, want in ((optax.sgd(0.1), (1, 0)),
                   (blaq_jax.blaq(0.01, active=1), (2, 0)),
                   (blaq_jax.blaq(0.01, active=blaq_jax.never), (1, 0)),
                   (blaq_jax.fogzo(0.01, n=3), (1, 6))):
    state = dict(setup.init_state, opt_state=tx.init(params))
    step = jax.jit(functools.partial(train_lib.train_step,
                                     graphdef=setup.train_def, tx=tx,
                                     loss=setup.loss))
    _, m = step(state, batch)
    assert (int(m["grad_evals"]), int(m["loss_evals"])) == want, tx


def test_skipped_step_is_counted_and_said(shared_data_dir):
  # A NaN image makes the gradient NaN: the method skips the step (params
  # unchanged) and the app logs the count the state keeps.
  config = tiny_config(shared_data_dir, method="laq", train_size=200,
                       num_tracked=0)
  setup = train_lib.Setup(config)
  state = setup.place(setup.init_state)
  x, y = setup.splits["train"]
  images = np.array(x[:100])
  images[0] = np.nan
  before = jax.device_get(state["params"])
  state, m = setup.jit_train_step(state, input_pipeline.global_batch(
      setup.mesh, {"image": images, "label": y[:100]}))
  assert int(m["skipped_steps"]) == 1
  chex.assert_trees_all_equal(jax.device_get(state["params"]), before)
  line = metrics_lib.epoch_line(dict(epoch=1, train_loss=0.5,
                                     train_accuracy=0.5, skipped_steps=1,
                                     epoch_time=1.0))
  assert "1 step(s) skipped so far (non-finite gradient)" in line


@pytest.mark.parametrize("method,bits", [
    ("bc", 1), ("bwn", 1), ("twn", 2), ("ste", 2), ("laq", 2), ("blaq", 1),
    ("fogzo", 1), ("n_spsa", 1)])
def test_factory_asks_every_quantizing_method_for_diagnostics(
    monkeypatch, method, bits):
  # The app logs flip_fraction and update_cosine: it must not rely on the
  # library's default for ``diagnostics``.
  calls = []
  create = methods_lib.create

  def spy(name, lr, **kw):
    calls.append((name, kw))
    return create(name, lr, **kw)

  monkeypatch.setattr(methods_lib, "create", spy)
  config = quick.get_config()
  config.method, config.bits = method, bits
  train_lib.make_optimizer(config, 10, 100)
  assert calls == [(method, calls[0][1])]
  assert calls[0][1]["diagnostics"] is True


def test_config_can_turn_the_diagnostics_off():
  config = quick.get_config()
  config.method, config.diagnostics = "laq", False
  tx = train_lib.make_optimizer(config, 10, 100)
  state = tx.init({"dense": {"kernel": jnp.ones((3, 2))}})
  assert isinstance(state.diagnostics, optax.EmptyState)
  config.diagnostics = True
  state = train_lib.make_optimizer(config, 10, 100).init(
      {"dense": {"kernel": jnp.ones((3, 2))}})
  assert not isinstance(state.diagnostics, optax.EmptyState)


def test_method_bits_mismatch_is_a_clear_error():
  config = quick.get_config()
  config.method, config.bits = "twn", 1
  with pytest.raises(ValueError, match="ternary"):
    train_lib.make_optimizer(config, 10, 100)
  config.method = "nope"
  with pytest.raises(ValueError,
                     match="--config.method='nope' is not a method"):
    train_lib.make_optimizer(config, 10, 100)


def test_export_then_eval_from_export_matches_checkpoint(shared_data_dir,
                                                         tmp_path, capsys):
  config = tiny_config(shared_data_dir, method="laq", bits=2)
  train_lib.train_and_evaluate(config, str(tmp_path))
  capsys.readouterr()
  path = train_lib.export_checkpoint(str(tmp_path), config,
                                     print_summary=True)
  report = capsys.readouterr().out
  assert "quantized layers" in report and "15.97x" in report, report  # 2-bit
  assert f"{os.path.getsize(path):,} bytes" in report
  from_ckpt = train_lib.evaluate_workdir(str(tmp_path), config)
  from_export = train_lib.evaluate_workdir(str(tmp_path), config,
                                           from_export=path)
  # The export holds q = alpha * Q[codes] exactly; the checkpoint's params are
  # optax.apply_updates' p + (q - p), an ulp off q where a level changed in
  # the last step (blaq_jax.export documents the gap), so the losses agree
  # to float32 rounding, not bit for bit.
  assert from_export.keys() == from_ckpt.keys()
  for key, value in from_ckpt.items():
    if key.endswith("accuracy"):
      assert from_export[key] == value, key
    else:
      np.testing.assert_allclose(from_export[key], value, rtol=1e-6)
  assert from_ckpt["test_accuracy"] == _epochs(tmp_path)[-1]["test_accuracy"]


def test_cli_train_with_overrides_then_eval(shared_data_dir, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  workdir = str(tmp_path / "run")
  common = ["--workdir", workdir]
  overrides = [f"--config.data_dir={shared_data_dir}",
               "--config.model_options.hidden=(16,)",
               "--config.train_size=400", "--config.test_size=200",
               "--config.validation_size=0", "--config.num_epochs=1",
               "--config.method=bwn", "--config.progress_bar=False",
               "--config.write_plots=False", "--config.tensorboard=False"]
  cmd = [sys.executable, "-m", "experiments.train", "--config",
         str(REPO / "experiments" / "configs" / "quick.py"), *common,
         *overrides]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["method"] == "bwn" and saved["model_options"]["hidden"] == [16]
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["step"] == 4  # 400 examples / batch 100 over 4 devices
  out = subprocess.run([sys.executable, "-m", "experiments.train", "eval",
                        *common], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout[out.stdout.index("{"):])
  assert result["test_accuracy"] == summary["final_test_accuracy"]


# ------------------------------------------------------- zig-zag, plots --

def test_table1_stats_of_a_known_trace():
  t = np.arange(20)
  zig = 0.3 + 0.02 * (-1.0) ** t          # amplitude 0.02, turns each step
  drift = -0.5 + 0.01 * t                  # no turning point
  latent = np.stack([zig, drift], axis=1)
  codes = (latent > 0.31).astype(float)    # zig flips every step
  stats = zigzag.table1_stats(latent, codes)
  assert stats["amplitude"] == pytest.approx(0.02)
  assert stats["amplitude_mean"] == pytest.approx(0.01)
  assert stats["frequency"] == pytest.approx(19 / 2)
  assert stats["frequency_max"] == 19
  with pytest.raises(ValueError, match="must match"):
    zigzag.table1_stats(latent, codes[:, :1])


def test_choose_tracked_draws_from_quantized_leaves_only():
  params = {"a": {"bias": np.zeros(5), "kernel": np.zeros((4, 3))},
            "b": {"kernel": np.zeros((2, 2))}}
  tracked = zigzag.choose_tracked(params, [0, 1, 1], num=10, seed=0)
  assert tracked == zigzag.choose_tracked(params, [0, 1, 1], 10, 0)
  assert len(set(tracked)) == 10
  assert all(leaf in (1, 2) and idx < (12 if leaf == 1 else 4)
             for leaf, idx in tracked)
  values = zigzag.gather_tracked(
      jax.tree.map(lambda x: jnp.arange(x.size).reshape(x.shape), params),
      tracked)
  np.testing.assert_array_equal(values, [i for _, i in tracked])


def test_toy_trajectories_newton_step_and_binary_points(tmp_path):
  paths = plots.toy_trajectories(start=(-0.05, 0.06), steps=10)
  for p in paths.values():
    np.testing.assert_allclose(p["latent"][0], [-0.05, 0.06])
    q = p["quantized"]
    np.testing.assert_allclose(np.abs(q[:, 0]), np.abs(q[:, 1]), rtol=1e-6)
  # LAQ with the exact Hessian and no momentum: w1 = w0 - H^-1 grad(q0).
  q0 = paths["laq"]["quantized"][0]
  grad = np.array([10 * (q0[0] - 0.054), 2 * (q0[1] + 0.055)])
  np.testing.assert_allclose(paths["laq"]["latent"][1],
                             np.array([-0.05, 0.06]) - grad / [10.0, 2.0],
                             rtol=1e-5)
  assert not np.allclose(paths["blaq"]["latent"][1],
                         paths["laq"]["latent"][1])
  out = plots.plot_toy_trajectories(str(tmp_path / "fig1.png"), paths)
  assert pathlib.Path(out).stat().st_size > 0


def test_results_table_and_time_to_target():
  def run(final, accs, walls):
    epochs = [dict(epoch=i + 1, test_accuracy=a, wall_time=w)
              for i, (a, w) in enumerate(zip(accs, walls))]
    return dict(summary=dict(final_test_accuracy=final,
                             best_test_accuracy=max(accs), grad_evals=10,
                             wall_time=walls[-1]), epochs=epochs, steps=[])
  runs = {"laq": [run(0.9, [0.8, 0.9], [1.0, 2.0])],
          "blaq": [run(0.95, [0.92, 0.95], [1.5, 3.0])]}
  # No target given: no time-to-target column (never one read off results).
  assert "epochs to" not in compare_lib.results_table(runs)
  table = compare_lib.results_table(runs, 0.9)
  assert "fixed before the runs: 90.00%" in table
  laq_row = next(line for line in table.splitlines()
                 if line.startswith("| laq"))
  blaq_row = next(line for line in table.splitlines()
                  if line.startswith("| blaq"))
  assert "| 2.0 (n = 1) |" in laq_row and "| 1.0 (n = 1) |" in blaq_row
  assert "not reached (1/1 runs)" in compare_lib.results_table(runs, 0.99)


# ------------------------------------------------ ablation, time to target --

def test_ablation_runs_variants_and_writes_a_table(shared_data_dir, tmp_path):
  from experiments import ablation
  config = tiny_config(shared_data_dir, train_size=300, test_size=200,
                       validation_size=0, num_tracked=0)
  variants = [ablation.parse_variant("laq:method=laq"),
              ablation.parse_variant("blended:method=blaq,moments=blended,"
                                     "blaq_period_epochs=1")]
  table = ablation.run(config, variants, [0], str(tmp_path))
  assert (tmp_path / "ablation.md").read_text().strip() == table
  assert table.count("\n| ") == 3 and "| blended |" in table  # + header
  saved = json.loads((tmp_path / "blended" / "blaq" / "seed_0" /
                      "config.json").read_text())
  assert saved["moments"] == "blended" and saved["method"] == "blaq"
  with pytest.raises(ValueError, match="unknown config field 'nope'"):
    ablation.run(config, [("x", {"nope": 1})], [0], str(tmp_path))
  with pytest.raises(ValueError, match="is not key=value"):
    ablation.parse_variant("x:method")


def test_time_to_accuracy_reads_logged_runs(tmp_path):
  from experiments.bench import time_to_accuracy
  curves = {"laq": [0.95, 0.975, 0.985], "blaq": [0.97, 0.986, 0.99]}
  dirs = {"laq": tmp_path / "one", "blaq": tmp_path / "two"}
  for method, accs in curves.items():
    metrics = dirs[method] / method / "seed_0" / "metrics"
    metrics.mkdir(parents=True)
    evals = 2 if method == "blaq" else 1
    metrics.joinpath("epochs.jsonl").write_text("".join(
        json.dumps(dict(epoch=e + 1, test_accuracy=a, wall_time=10.0 * (e + 1),
                        grad_evals=100 * evals * (e + 1), loss_evals=0)) + "\n"
        for e, a in enumerate(accs)))
  both = f"{dirs['laq']},{dirs['blaq']}"  # two comparisons, one table
  rows = time_to_accuracy.main(["--workdir", both, "--targets", "0.98,0.995"])
  got = {(r["method"], r["target"]): r for r in rows}
  assert got[("laq", 0.98)]["epoch"] == 3 and got[("laq", 0.98)][
      "grad_evals"] == 300
  assert got[("blaq", 0.98)]["epoch"] == 2 and got[("blaq", 0.98)][
      "grad_evals"] == 400
  assert got[("blaq", 0.995)]["reached"] == 0
  assert (dirs["laq"] / "accuracy_vs_cost_grad_evals.png").stat().st_size > 0
  with pytest.raises(SystemExit, match="'laq' is in more than one"):
    time_to_accuracy.main(["--workdir", f"{dirs['laq']},{dirs['laq']}"])


def test_blaq_epoch_offset_moves_the_active_epochs():
  # m = 5 with the x0.1-every-5-epochs decay: offset 0 makes the active
  # epochs the first after each decay; offset 2 moves them inside.
  from experiments.configs import mnist_mlp
  config = mnist_mlp.get_config()
  steps = 10
  active = lambda c: [e for e in range(12)  # noqa: E731
                      if bool(train_lib.blaq_schedule(c, steps)(e * steps))]
  assert active(config) == [0, 5, 10]
  config.blaq_epoch_offset = 2
  assert active(config) == [2, 7]
  config.blaq_epoch_offset = -1
  with pytest.raises(train_lib.ConfigError,
                     match=r"--config.blaq_epoch_offset.*must be >= 0"):
    train_lib.validate_config(config)
