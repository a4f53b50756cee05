"""The regime-map driver (experiments/regime.py) on a tiny grid."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import regime

TINY = regime.Settings(seeds=2, epochs=2, decay_epochs=1, train_size=300,
                       validation_size=200, test_size=200)


@pytest.fixture(scope="module")
def splits(shared_data_dir):
  return regime.load_splits("mnist", TINY, shared_data_dir)


def _orders(seeds, epoch, n=300):
  return jnp.asarray(np.stack([regime.data_order(s, epoch, n, 100)
                               for s in seeds]))


def test_seeds_are_paired_across_methods(splits):
  laq = regime.Runner("laq", 1, TINY, 3)
  blaq = regime.Runner("blaq_lookahead", 1, TINY, 3)
  s_laq, s_blaq = laq.init([0, 1]), blaq.init([0, 1])
  # Same initialisation per seed (params and batch-norm statistics) ...
  chex.assert_trees_all_equal(s_laq["params"], s_blaq["params"])
  chex.assert_trees_all_equal(s_laq["batch_stats"], s_blaq["batch_stats"])
  # ... different between seeds ...
  k0 = s_laq["params"]["dense"][0]["kernel"]
  assert not np.array_equal(k0[0], k0[1])
  # ... and the same data order: the loss of the first step (before any
  # update) is the same for both methods, seed by seed.
  order = _orders([0, 1], 0)
  _, m_laq = laq.run_epoch(s_laq, *splits["train"], order, jnp.float32(0.01))
  _, m_blaq = blaq.run_epoch(s_blaq, *splits["train"], order,
                             jnp.float32(0.01))
  np.testing.assert_array_equal(m_laq["loss"][:, 0], m_blaq["loss"][:, 0])
  assert m_laq["loss"][0, 0] != m_laq["loss"][1, 0]
  # After the first step the methods part.
  assert not np.allclose(m_laq["loss"][:, 1:], m_blaq["loss"][:, 1:])


def test_data_order_depends_on_seed_and_epoch_only():
  a = regime.data_order(3, 1, 1000, 100)
  np.testing.assert_array_equal(a, regime.data_order(3, 1, 1000, 100))
  assert not np.array_equal(a, regime.data_order(3, 2, 1000, 100))
  assert not np.array_equal(a, regime.data_order(4, 1, 1000, 100))
  np.testing.assert_array_equal(np.sort(a.ravel()), np.arange(1000))


@pytest.mark.parametrize("method", ["laq", "blaq_gradients"])
def test_vmapped_epoch_equals_one_seed_alone(splits, method):
  runner = regime.Runner(method, 2, TINY, 3)
  lr = jnp.float32(0.02)
  order = _orders([0, 1], 0)
  state, metrics = runner.run_epoch(runner.init([0, 1]), *splits["train"],
                                    order, lr)
  # Seed 1 alone, step by step, without vmap or scan.
  x, y = splits["train"]
  single = runner.init([1])
  single = jax.tree.map(lambda v: v[0], single)
  step = jax.jit(runner.train_step)
  losses = []
  for idx in np.asarray(order[1]):
    single, m = step(single, x[idx], y[idx], lr)
    losses.append(m["loss"])
  seed1 = jax.tree.map(lambda v: v[1], state)
  chex.assert_trees_all_close(seed1["params"], single["params"], atol=1e-5)
  chex.assert_trees_all_close(seed1["batch_stats"], single["batch_stats"],
                              atol=1e-5)
  np.testing.assert_allclose(metrics["loss"][1], np.asarray(losses),
                             rtol=1e-5)
  # The evaluation of the vmapped state equals that of seed 1 alone.
  loss, acc = runner.evaluate(state, *splits["test"])
  single_b = jax.tree.map(lambda v: v[None], single)
  loss1, acc1 = runner.evaluate(single_b, *splits["test"])
  np.testing.assert_allclose(acc[1], acc1[0], atol=1 / 200 + 1e-6)


def test_evaluate_counts_by_hand(splits):
  runner = regime.Runner("laq", 1, TINY, 3)
  state = runner.init([0])
  x, y = splits["test"]
  _, acc = runner.evaluate(state, x[:250], y[:250])  # a padded last chunk
  model_out = runner._outputs(
      runner.eval_def, jax.tree.map(lambda v: v[0], state["params"]),
      jax.tree.map(lambda v: v[0], state["batch_stats"]), x[:250])[0]
  expected = np.mean(np.argmax(np.asarray(model_out), -1) == np.asarray(
      y[:250]))
  np.testing.assert_allclose(acc[0], expected, atol=1e-6)


def test_run_grid_writes_then_skips_a_finished_cell(tmp_path,
                                                    shared_data_dir):
  settings = dataclasses.replace(TINY, epochs=1, decay_epochs=0)
  cells = regime.grid(["mnist"], [1], [0.01], ["blaq_moments"])
  written = regime.run_grid(cells, settings, tmp_path,
                            data_dir=shared_data_dir, log=lambda s: None)
  path = regime.cell_path(tmp_path, cells[0])
  assert written == [path]
  record = json.loads(path.read_text())
  assert record["complete"] and record["seeds"] == [0, 1]
  assert np.shape(record["metrics"]["test_accuracy"]) == (2, 1)
  assert record["grad_evals_per_step"] == 2
  mtime = path.stat().st_mtime_ns
  assert regime.run_grid(cells, settings, tmp_path, data_dir=shared_data_dir,
                         log=lambda s: None) == []
  assert path.stat().st_mtime_ns == mtime
  # A finished cell of other settings is refused, not mixed in.
  other = dataclasses.replace(settings, seeds=3)
  with pytest.raises(ValueError, match="settings"):
    regime.run_grid(cells, other, tmp_path, data_dir=shared_data_dir,
                    log=lambda s: None)


def test_unknown_method_is_refused():
  with pytest.raises(ValueError, match="unknown method"):
    regime.Cell("mnist", 1, 0.01, "blaq_sideways")
