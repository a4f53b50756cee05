"""LAQ/BLAQ composed with Optax wrappers, jit, pmap and sharding."""

import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import blaq_jax


def problem(n=64, seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  params = {"dense": {"kernel": jax.random.normal(k1, (6, 8)) * 0.3,
                      "bias": jnp.zeros(8)},
            "out": {"kernel": jax.random.normal(k2, (8, 3)) * 0.3}}
  x = jax.random.normal(k3, (n, 6))
  y = jax.random.randint(k4, (n,), 0, 3)

  # The paper's L2-SVM loss (squared hinge). Softmax cross-entropy would not
  # do: it is invariant to adding a constant to all logits, and a 1-bit
  # output row of equal signs then gives a hidden bias a gradient of pure
  # rounding noise (~1e-10), which Adam's normalisation turns into O(lr).
  def loss(p, xb, yb):
    h = jnp.tanh(xb @ p["dense"]["kernel"] + p["dense"]["bias"])
    logits = h @ p["out"]["kernel"]
    signs = 2.0 * jax.nn.one_hot(yb, 3) - 1.0
    return jnp.mean(jnp.sum(jnp.maximum(0.0, 1.0 - signs * logits) ** 2, -1))

  return params, loss, x, y


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


@pytest.mark.parametrize("factory,static", [
    (blaq_jax.laq, ("bits",)), (blaq_jax.blaq, ("bits", "active"))])
def test_inject_hyperparams_gives_identical_updates(factory, static):
  kwargs = dict(bits=2)
  if factory is blaq_jax.blaq:
    kwargs.update(a=0.7, active=2)
  plain = factory(0.01, **kwargs)
  injected = optax.inject_hyperparams(factory, static_args=static)(
      learning_rate=0.01, **kwargs)
  # One step: an injected lr is an array, a plain one a constant XLA may
  # fold; the results agree to float rounding (a later flip of a latent at
  # zero would amplify an ulp, so longer runs are not compared exactly).
  p1, _ = steps(plain, n_steps=1)
  p2, s2 = steps(injected, n_steps=1)
  chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-7)
  assert float(s2.hyperparams["learning_rate"]) == pytest.approx(0.01)


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


def test_multisteps_equals_one_step_on_the_mean_gradient():
  params, loss, x, y = problem()
  inner = blaq_jax.laq(0.01)
  ms = optax.MultiSteps(inner, every_k_schedule=2)
  s_ms, s_in = ms.init(params), inner.init(params)
  g1 = jax.grad(loss)(params, x[:32], y[:32])
  g2 = jax.grad(loss)(params, x[32:], y[32:])
  u0, s_ms = ms.update(g1, s_ms, params)
  chex.assert_trees_all_equal(u0, jax.tree.map(jnp.zeros_like, u0))
  u1, s_ms = ms.update(g2, s_ms, params)
  ref, _ = inner.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), s_in,
                        params)
  chex.assert_trees_all_close(u1, ref, rtol=1e-5, atol=1e-7)


def test_multisteps_with_blaq_grad_fn():
  params, loss, x, y = problem()
  ms = optax.MultiSteps(blaq_jax.blaq(0.01), every_k_schedule=2)
  state = ms.init(params)
  gf = lambda p: jax.grad(loss)(p, x, y)
  for _ in range(4):
    u, state = jax.jit(lambda g, s, p: ms.update(g, s, p, grad_fn=gf))(
        gf(params), state, params)
    params = optax.apply_updates(params, u)
  assert int(optax.tree.get(state.inner_opt_state, "count")) == 2


def test_apply_if_finite_skips_nan_step_and_loses_nothing():
  params, loss, x, y = problem()
  opt = optax.apply_if_finite(blaq_jax.blaq(0.01), max_consecutive_errors=3)
  state = opt.init(params)
  gf = lambda p: jax.grad(loss)(p, x, y)
  u, state = opt.update(gf(params), state, params, grad_fn=gf)
  params = optax.apply_updates(params, u)
  before = state
  nan_g = jax.tree.map(lambda g: g * jnp.nan, gf(params))
  u, state = opt.update(nan_g, state, params, grad_fn=gf)
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, u))
  chex.assert_trees_all_equal(state.inner_state, before.inner_state)
  assert int(state.notfinite_count) == 1


@pytest.mark.parametrize("factory", [blaq_jax.laq, blaq_jax.blaq])
def test_jit_does_not_recompile(factory):
  params, loss, x, y = problem()
  opt = factory(0.01, **({"active": 2} if factory is blaq_jax.blaq else {}))
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p, x, y)
    u, s = opt.update(g, s, p, grad_fn=lambda q: jax.grad(loss)(q, x, y))
    return optax.apply_updates(p, u), s

  for _ in range(3):
    params, state = step(params, state)
  assert step._cache_size() == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_are_kept(dtype):
  params, loss, x, y = problem()
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  opt = blaq_jax.blaq(0.01)
  state = opt.init(params)
  gf = lambda p: jax.grad(loss)(p, x.astype(dtype), y)
  u, state = opt.update(gf(params), state, params, grad_fn=gf)
  new = optax.apply_updates(params, u)
  chex.assert_trees_all_equal_dtypes(u, params)
  chex.assert_trees_all_equal_dtypes(new, params)
  chex.assert_trees_all_equal_dtypes(optax.tree.get(state, "mu"), params)
  qt = blaq_jax.quantized_tensors(state)["dense"]["kernel"]
  np.testing.assert_allclose(new["dense"]["kernel"].astype(jnp.float32),
                             qt.dequantize(dtype).astype(jnp.float32),
                             rtol=2 ** -7)


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


# --- multi-device ------------------------------------------------------------

def test_pmap_with_batch_axis_name_equals_one_device():
  n_dev = 8
  assert jax.local_device_count() >= n_dev
  params, loss, x, y = problem(n=64)
  opt = blaq_jax.blaq(0.02, batch_axis_name="batch")
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)

  def step(p, s, xb, yb):
    g = jax.lax.pmean(jax.grad(loss)(p, xb, yb), "batch")
    u, s = opt.update(g, s, p, grad_fn=lambda q: jax.grad(loss)(q, xb, yb))
    return optax.apply_updates(p, u), s

  rep = lambda t: jax.tree.map(lambda a: jnp.stack([a] * n_dev), t)  # noqa
  pp, ps = rep(params), rep(state)
  xs, ys = x.reshape(n_dev, -1, 6), y.reshape(n_dev, -1)
  pstep = jax.pmap(step, axis_name="batch")

  single = blaq_jax.blaq(0.02)
  sp, ss = params, state  # the same latent start as the replicas
  for _ in range(3):
    pp, ps = pstep(pp, ps, xs, ys)
    g = jax.grad(loss)(sp, x, y)
    u, ss = single.update(g, ss, sp,
                          grad_fn=lambda q: jax.grad(loss)(q, x, y))
    sp = optax.apply_updates(sp, u)
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], pp), sp,
                              rtol=1e-5, atol=1e-6)


def test_sharded_batch_under_jit_equals_one_device():
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  params, loss, x, y = problem(n=64)
  opt = blaq_jax.blaq(0.02)
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)

  @jax.jit
  def step(p, s, xb, yb):
    g = jax.grad(loss)(p, xb, yb)
    u, s = opt.update(g, s, p, grad_fn=lambda q: jax.grad(loss)(q, xb, yb))
    return optax.apply_updates(p, u), s

  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ys = jax.device_put(y, NamedSharding(mesh, P("data")))
  p1, s1, p2, s2 = params, state, params, state
  for _ in range(3):
    p1, s1 = step(p1, s1, xs, ys)
    p2, s2 = step(p2, s2, x, y)
  chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-6)


def test_state_follows_params_sharding():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  params = {"dense": {"kernel": jnp.ones((8, 16)), "bias": jnp.zeros(16)}}
  shardings = {"dense": {"kernel": NamedSharding(mesh, P("data", "model")),
                         "bias": NamedSharding(mesh, P("model"))}}
  params = jax.device_put(params, shardings)
  for opt in (blaq_jax.blaq(0.01), optax.adam(0.01)):
    state = opt.init(params)
    if isinstance(state, blaq_jax.QuantizedLatentState):
      assert state.latent["dense"]["kernel"].sharding.is_equivalent_to(
          shardings["dense"]["kernel"], 2)
      codes = blaq_jax.codes(state)["dense"]["kernel"]
      assert codes.sharding.is_equivalent_to(shardings["dense"]["kernel"], 2)
      mu = optax.tree.get(state, "mu")
    else:
      mu = state[0].mu
    assert mu["dense"]["kernel"].sharding.is_equivalent_to(
        shardings["dense"]["kernel"], 2)
  # init on abstract inputs (as optax's sharding tests do)
  abstract = jax.eval_shape(blaq_jax.blaq(0.01).init, params)
  chex.assert_shape(abstract.latent["dense"]["kernel"], (8, 16))
