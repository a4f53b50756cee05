"""LAQ/BLAQ in Optax chains, with schedules, pickled and checkpointed.

What every method does under jit, MultiSteps, apply_if_finite,
inject_hyperparams, pmap and sharding is in test_conformance.py.
"""

import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax
from problems import classifier as problem


def steps(opt, n_steps=4, **kw):
  params, loss, x, y = problem()
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)
  for _ in range(n_steps):
    g = jax.grad(loss)(params, x, y)
    u, state = opt.update(g, state, params,
                          grad_fn=lambda p: jax.grad(loss)(p, x, y), **kw)
    params = optax.apply_updates(params, u)
  return params, state


@pytest.mark.parametrize("factory", [blaq_jax.laq, blaq_jax.blaq])
def test_chain_with_clipping_and_weight_decay(factory):
  opt = optax.chain(optax.clip_by_global_norm(0.5),
                    optax.add_decayed_weights(1e-4), factory(0.01))
  params, state = steps(opt)
  qt = blaq_jax.quantized_tensors(state)["dense"]["kernel"]
  np.testing.assert_allclose(params["dense"]["kernel"], qt.dequantize(),
                             atol=1e-7)


def test_inject_hyperparams_with_schedules():
  lr = optax.linear_schedule(0.02, 0.0, 10)
  a = optax.linear_schedule(0.9, 0.5, 10)
  injected = optax.inject_hyperparams(
      blaq_jax.blaq, static_args=("bits", "active"))(learning_rate=lr, a=a)
  p1, s = steps(injected, n_steps=3)
  p2, _ = steps(blaq_jax.blaq(lr, a=a), n_steps=3)
  chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-6)
  # inject_hyperparams records the values it used in the last update, at
  # count 2 for the third step.
  assert float(s.hyperparams["a"]) == pytest.approx(0.9 - 0.4 * 2 / 10)


def test_traced_bits_is_a_clear_error():
  opt = optax.inject_hyperparams(blaq_jax.laq)(learning_rate=0.1, bits=2)
  with pytest.raises(TypeError, match="static_args"):
    opt.init(problem()[0])


def test_pickle_and_orbax_round_trip(tmp_path):
  _, state = steps(blaq_jax.blaq(0.01, bits=2))
  chex.assert_trees_all_equal(pickle.loads(pickle.dumps(state)), state)
  ocp = pytest.importorskip("orbax.checkpoint")
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "state", state)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "state", state)
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_dtypes(restored, state)
