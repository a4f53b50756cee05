"""FOGZO and n-SPSA: estimator statistics, transforms, conformance."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax
from blaq_jax import quantizers
from blaq_jax.levels import LevelSet
from problems import mlp_problem, train_mlp

ALL = lambda path, leaf: True  # quantize every leaf  # noqa: E731


# --- the estimator ---------------------------------------------------------------

@pytest.mark.parametrize("beta,noise,norm,n", [
    (0.0, "identity", "global", 1),      # n-SPSA
    (0.5, "tanh", "global", 2),
    (0.9, "approx_sign", "per_layer", 1),
    (0.999, "hardtanh", "global", 1),
])
def test_estimator_is_unbiased_on_a_quadratic(beta, noise, norm, n):
  """E[G] = E^-1 (beta g_hat g_hat^T + (1 - beta) I) E grad L.

  For a quadratic the central difference is exact, (L(w + e v) - L(w - e v))
  / 2 = grad L . e v, and smoothing by zero-mean noise does not change the
  gradient, so this is the expectation of FOGZO.md for the smoothed loss.
  The tolerance is 5 standard errors of the Monte Carlo mean.
  """
  rng = np.random.default_rng(0)
  d = 7
  m = rng.normal(size=(d, d))
  a = m @ m.T / d + np.eye(d)
  c = rng.normal(size=d)
  flat = lambda t: jnp.concatenate([t["a"], t["b"].ravel()])  # noqa: E731
  loss = lambda t: 0.5 * (flat(t) - c) @ jnp.asarray(a, jnp.float32) @ (  # noqa
      flat(t) - c)
  w = {"a": jnp.asarray(rng.normal(size=3), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}
  g = {"a": jnp.asarray(rng.normal(size=3), jnp.float32),  # any direction
       "b": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}
  eps = {"a": 0.05, "b": jnp.array([0.2, 0.1])}  # per leaf, per channel

  samples = 20_000
  keys = jax.random.split(jax.random.PRNGKey(42), samples)
  est = jax.jit(jax.vmap(lambda k: flat(blaq_jax.fogzo_gradient(
      loss, w, g, eps, k, beta=beta, n=n, noise=noise, norm=norm)[0])))(keys)
  est = np.asarray(est, np.float64)

  e = np.concatenate([np.full(3, 0.05), np.tile([0.2, 0.1], 2)])
  gx = e * np.asarray(flat(g), np.float64)
  if norm == "global":
    g_hat = gx / np.linalg.norm(gx)
  else:
    g_hat = np.concatenate([gx[:3] / np.linalg.norm(gx[:3]) * math.sqrt(3 / d),
                            gx[3:] / np.linalg.norm(gx[3:]) * math.sqrt(4 / d)])
  grad = a @ (np.asarray(flat(w), np.float64) - c)
  expected = (beta * g_hat * (g_hat @ (e * grad)) + (1 - beta) * e * grad) / e

  stderr = est.std(0) / math.sqrt(samples)
  np.testing.assert_array_less(np.abs(est.mean(0) - expected),
                               5 * stderr + 1e-5)
  # The check has power: its tolerance is small next to the signal.
  assert np.linalg.norm(5 * stderr) < 0.25 * np.linalg.norm(expected)


def test_estimator_with_beta_one_is_the_projection_on_the_ste_direction():
  w = {"a": jnp.array([0.3, -0.2, 0.5])}
  g = {"a": jnp.array([1.0, 2.0, -1.0])}
  loss = lambda t: jnp.sum(jnp.sin(t["a"]) * jnp.array([1.0, -2.0, 0.5]))  # noqa
  G, fds = blaq_jax.fogzo_gradient(loss, w, g, {"a": 1e-3},
                                   jax.random.PRNGKey(0), beta=1.0, n=3)
  g_hat = g["a"] / jnp.linalg.norm(g["a"])
  directional = jnp.vdot(jax.grad(loss)(w)["a"], g_hat)
  np.testing.assert_allclose(G["a"], directional * g_hat, rtol=2e-3)
  np.testing.assert_allclose(jnp.abs(fds), jnp.abs(directional) * 1e-3,
                             rtol=2e-3)


def test_directions_batch_gives_the_same_estimate():
  params, loss, _ = mlp_problem()
  g = jax.grad(loss)(params)
  eps = jax.tree.map(lambda _: 0.01, params)
  key = jax.random.PRNGKey(3)
  g1, f1 = blaq_jax.fogzo_gradient(loss, params, g, eps, key, beta=0.5, n=4)
  g2, f2 = blaq_jax.fogzo_gradient(loss, params, g, eps, key, beta=0.5, n=4,
                                   directions_batch=2)
  np.testing.assert_allclose(f1, f2, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(g1, g2, rtol=1e-3, atol=1e-5)


# --- the transforms --------------------------------------------------------------

@pytest.mark.parametrize("config", [
    dict(quantizer="uniform", bits=3, scale=0.5, surrogate="identity",
         eps_scale=3.0),
    dict(quantizer="sign", scale=1.0, surrogate="hardtanh", eps_scale=3.0),
])
def test_beta_one_reproduces_the_ste_direction(config):
  """beta = 1, no noise: the latent step is fd * g_hat, g_hat the STE one."""
  rng = np.random.default_rng(1)
  w0 = rng.normal(scale=0.7, size=(3, 4)).astype(np.float32)
  target = rng.normal(scale=0.7, size=(3, 4)).astype(np.float32)
  loss = lambda p: jnp.sum((p["w"] - target) ** 2)  # noqa: E731
  opt = blaq_jax.fogzo(None, optimizer=optax.sgd(1.0), beta=1.0,
                       quantize=ALL, **config)
  params = {"w": jnp.asarray(w0)}
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)
  g = np.asarray(jax.grad(loss)(params)["w"], np.float64)
  _, state = opt.update(jax.grad(loss)(params), state, params, loss_fn=loss)
  G = w0 - np.asarray(blaq_jax.latent_params(state)["w"], np.float64)

  s, surrogate = config["scale"], config["surrogate"]
  level_set = (LevelSet("blaq", 1) if config["quantizer"] == "sign"
               else LevelSet("linear", config["bits"]))
  values = level_set.values.astype(np.float64)
  step = s * values[values > 0].min()
  eps = config["eps_scale"] * quantizers.EPS_BAR[surrogate] * step
  mask = np.abs(w0 / s) <= 1 if surrogate == "hardtanh" else 1.0
  ste_g = g * mask
  g_hat = ste_g / np.linalg.norm(ste_g)

  def requantized_loss(w):
    q = s * values[np.argmin(np.abs((w / s)[..., None] - values), -1)]
    return np.sum((q - target) ** 2)

  fd = (requantized_loss(w0 + eps * g_hat)
        - requantized_loss(w0 - eps * g_hat)) / (2 * eps)
  assert fd != 0  # the perturbation crosses level boundaries
  np.testing.assert_allclose(G, fd * g_hat, rtol=1e-4, atol=1e-6)
  assert float(optax.tree.get(state, "grad_cosine")) == pytest.approx(np.sign(fd),
                                                             abs=1e-5)


def test_beta_zero_equals_n_spsa_for_the_same_seed():
  kw = dict(n=3, seed=7, quantizer="uniform", bits=2, surrogate="identity")
  p1, s1 = train_mlp(blaq_jax.fogzo(0.02, beta=0.0, **kw), steps=3)
  p2, s2 = train_mlp(blaq_jax.n_spsa(0.02, **kw), steps=3)
  chex.assert_trees_all_equal(p1, p2)
  chex.assert_trees_all_equal(s1, s2)
  assert float(optax.tree.get(s2, "beta")) == 0.0 and bool(optax.tree.get(s2, "active"))


def test_key_in_state_makes_runs_reproducible():
  p1, s1 = train_mlp(blaq_jax.fogzo(0.05, beta_min=0.5, seed=1), steps=3)
  p2, s2 = train_mlp(blaq_jax.fogzo(0.05, beta_min=0.5, seed=1), steps=3)
  p3, _ = train_mlp(blaq_jax.fogzo(0.05, beta_min=0.5, seed=2), steps=3)
  chex.assert_trees_all_equal(p1, p2)
  chex.assert_trees_all_equal(optax.tree.get(s1, "key"), optax.tree.get(s2, "key"))
  lat = lambda s: blaq_jax.latent_params(s)["l1"]["kernel"]  # noqa: E731
  _, s3 = train_mlp(blaq_jax.fogzo(0.05, beta_min=0.5, seed=2), steps=3)
  assert not np.allclose(lat(s1), lat(s3))
  del p3


def test_beta_decays_linearly_from_one_to_beta_min():
  opt = blaq_jax.fogzo(0.01, beta_min=0.5, beta_decay_steps=4)
  params, loss, _ = mlp_problem()
  state = opt.init(params)
  betas = []
  for _ in range(6):
    u, state = opt.update(jax.grad(loss)(params), state, params, loss_fn=loss)
    params = optax.apply_updates(params, u)
    betas.append(float(optax.tree.get(state, "beta")))
  np.testing.assert_allclose(betas, [1.0, 0.875, 0.75, 0.625, 0.5, 0.5])


def test_active_schedule_runs_fogzo_on_a_fraction_of_the_steps():
  params, loss, _ = mlp_problem()
  calls = []

  def counting_loss(p):
    jax.debug.callback(lambda: calls.append(1))
    return loss(p)

  opt = blaq_jax.fogzo(0.02, n=2, active=lambda s: s % 3 == 0)
  state = opt.init(params)
  step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p,
                                         loss_fn=counting_loss))
  active = []
  for _ in range(6):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
    active.append(bool(optax.tree.get(state, "active")))
  jax.effects_barrier()
  assert active == [True, False, False, True, False, False]
  assert len(calls) == 2 * 2 * 2  # 2 active steps x n = 2 x (+, -)


def test_never_active_fogzo_is_ste():
  kw = dict(quantizer="ternary", scale="twn")
  p_ste, s_ste = train_mlp(blaq_jax.ste(0.05, **kw), steps=3)
  for active in (lambda s: False, lambda s: s < 0):  # static, traced
    p, s = train_mlp(blaq_jax.fogzo(0.05, active=active, **kw), steps=3)
    chex.assert_trees_all_close(p, p_ste, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(s.latent, s_ste.latent, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make,level_set", [
    (lambda: blaq_jax.fogzo(0.05, beta_min=0.99, n=2), LevelSet("blaq", 1)),
    (lambda: blaq_jax.fogzo(0.05, quantizer="uniform", bits=3,
                            surrogate="identity", norm="per_layer",
                            channel_axis=-1), LevelSet("linear", 3)),
    (lambda: blaq_jax.n_spsa(0.05, n=4, quantizer="ternary",
                             surrogate="approx_sign"), LevelSet("linear", 2)),
])
def test_params_are_on_the_level_set_after_every_step(make, level_set):
  opt = make()
  params, loss, _ = mlp_problem()
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)
  step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p,
                                         loss_fn=loss))
  for _ in range(5):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    for layer in ("l1", "l2"):
      qt = blaq_jax.quantized_tensors(state)[layer]["kernel"]
      assert qt.level_set == level_set
      exact = np.asarray(qt.dequantize())
      np.testing.assert_allclose(params[layer]["kernel"], exact, rtol=0,
                                 atol=np.spacing(np.abs(exact).max()))
      alpha = np.asarray(qt.alpha)
      beta = exact / (alpha if alpha.ndim == 0 else alpha[None, :])
      assert np.all(np.min(np.abs(beta[..., None] - level_set.values), -1)
                    < 1e-6)


def test_full_precision_leaves_keep_their_backprop_gradient():
  params, loss, _ = mlp_problem()
  grads = jax.grad(loss)(params)
  for opt in (blaq_jax.fogzo(0.01), blaq_jax.n_spsa(0.01, n=2)):
    u, _ = opt.update(grads, opt.init(params), params, loss_fn=loss)
    adam = optax.adam(0.01)
    ua, _ = adam.update(grads, adam.init(params), params)
    np.testing.assert_allclose(u["l2"]["bias"], ua["l2"]["bias"], rtol=1e-6)


def test_inject_hyperparams_gives_identical_updates():
  params, loss, _ = mlp_problem()
  kw = dict(learning_rate=0.02, beta_min=0.9, beta_decay_steps=3, n=2,
            seed=3)
  plain = blaq_jax.fogzo(**kw)
  injected = optax.inject_hyperparams(blaq_jax.fogzo, static_args=("n",))(
      **kw)
  p1, s1 = params, plain.init(params)
  p2, s2 = params, injected.init(params)
  step = jax.jit(lambda opt, p, s: opt.update(jax.grad(loss)(p), s, p,
                                              loss_fn=loss),
                 static_argnums=0)
  for _ in range(3):
    u1, s1 = step(plain, p1, s1)
    u2, s2 = step(injected, p2, s2)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-7)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  with pytest.raises(TypeError, match="static_args=\\('n',\\)"):
    optax.inject_hyperparams(blaq_jax.fogzo)(0.01, n=2).update(
        jax.grad(loss)(params),
        optax.inject_hyperparams(blaq_jax.fogzo)(0.01, n=2).init(params),
        params, loss_fn=loss)


def test_bad_input_errors():
  params, loss, _ = mlp_problem()
  grads = jax.grad(loss)(params)
  opt = blaq_jax.fogzo(0.01)
  with pytest.raises(ValueError, match="loss_fn"):
    opt.update(grads, opt.init(params), params)
  spsa = blaq_jax.n_spsa(0.01)
  with pytest.raises(ValueError, match="n_spsa needs the keyword argument "
                     "loss_fn"):
    spsa.update(grads, spsa.init(params), params, grad_fn=jax.grad(loss))
  with pytest.raises(ValueError, match="beta must be"):
    blaq_jax.fogzo(0.01, beta=1.5)
  with pytest.raises(ValueError, match="beta_min must be"):
    blaq_jax.fogzo(0.01, beta_min=-0.1)
  with pytest.raises(ValueError, match="n must be an int >= 1"):
    blaq_jax.fogzo(0.01, n=0)
  with pytest.raises(ValueError, match="n must be an int >= 1"):
    blaq_jax.n_spsa(0.01, n=-2)
  with pytest.raises(ValueError, match="surrogate='straight'"):
    blaq_jax.fogzo(0.01, surrogate="straight")
  with pytest.raises(ValueError, match="norm"):
    blaq_jax.fogzo(0.01, norm="layer")
  with pytest.raises(ValueError, match="eps_scale"):
    blaq_jax.n_spsa(0.01, eps_scale=0.0)
  with pytest.raises(ValueError, match="active"):
    blaq_jax.fogzo(0.01, active=0)
  with pytest.raises(TypeError, match="seed must be an int, got 1.5"):
    blaq_jax.fogzo(0.01, seed=1.5)
  with pytest.raises(ValueError, match="scalar"):
    opt.update(grads, opt.init(params), params,
               loss_fn=lambda p: jnp.ones(3) * loss(p))
