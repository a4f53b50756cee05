"""BLAQ's three readings of Algorithm 1 against a numpy transcription of it.

The reference below is written from METHOD.md's table, line by line, in
float64; the transform runs in float32.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax

B2, EPS, LR = 0.999, 1e-8, 0.02


def np_project(w, d):
  """1-bit Algorithm 2 (exact): ``beta = sign(w)``, weighted mean of |w|."""
  return np.sum(d * np.abs(w)) / np.sum(d) * np.where(w < 0, -1.0, 1.0)


def np_run(w0, grad, *, steps, active_from, blend, a, b1):
  """LAQ steps, then BLAQ steps from ``active_from`` on (count 0-based)."""
  w = w0.copy()
  q = np_project(w, np.ones_like(w))  # init projects with D = 1
  m, v = np.zeros_like(w), np.zeros_like(w)
  for count in range(steps):
    t = count + 1
    g = grad(q)  # lines 1-12
    m, v = b1 * m + (1 - b1) * g, B2 * v + (1 - B2) * g * g  # 13-15
    m_hat = m / (1 - b1 ** t)
    d = (EPS + np.sqrt(v / (1 - B2 ** t))) / LR
    if count < active_from:  # LAQ
      w = w - m_hat / d
      q = np_project(w, d)
      continue
    q_star = np_project(w - m_hat / d, d)  # 16
    g_star = grad(q_star)  # 17-20
    m_s = b1 * m + (1 - b1) * g_star  # 22
    v_s = B2 * v + (1 - B2) * g_star ** 2
    m_hat_s = m_s / (1 - b1 ** (t + 1))
    d_s = (EPS + np.sqrt(v_s / (1 - B2 ** (t + 1)))) / LR
    direction = {"moments": a * m_hat + (1 - a) * m_hat_s,  # 21
                 "lookahead": a * m_hat + (1 - a) * g_star,
                 "gradients": a * g + (1 - a) * g_star}[blend]
    d_bar = a * d + (1 - a) * d_s  # 23
    w = w - direction / d_bar  # 24
    q = np_project(w, d_bar)
  return w, q


def problem():
  rng = np.random.default_rng(3)
  w0 = rng.normal(scale=0.3, size=(5, 4))
  h = rng.uniform(0.5, 4.0, size=w0.shape)
  c = rng.normal(scale=0.5, size=w0.shape)
  return w0, h, c


def run(opt, w0, h, c, steps):
  loss = lambda p: 0.5 * jnp.sum(h * (p["kernel"] - c) ** 2)  # noqa: E731
  params = {"kernel": jnp.asarray(w0, jnp.float32)}
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)
  step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p,
                                         grad_fn=jax.grad(loss)))
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("blend", ["moments", "lookahead", "gradients"])
def test_active_step_after_laq_steps_matches_algorithm_1(blend):
  w0, h, c = problem()
  opt = blaq_jax.blaq(LR, a=0.6, b1=0.9, blend=blend,
                      active=lambda count: count >= 3)
  params, state = run(opt, w0, h, c, steps=4)
  w, q = np_run(w0, lambda q: h * (q - c), steps=4, active_from=3,
                blend=blend, a=0.6, b1=0.9)
  np.testing.assert_allclose(blaq_jax.latent_params(state)["kernel"], w,
                             rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(params["kernel"], q, rtol=2e-5, atol=1e-6)


def test_the_readings_differ_with_momentum():
  w0, h, c = problem()
  latents = []
  for blend in ("moments", "lookahead", "gradients"):
    opt = blaq_jax.blaq(LR, a=0.6, b1=0.9, blend=blend,
                        active=lambda count: count >= 3)
    latents.append(np.asarray(blaq_jax.latent_params(
        run(opt, w0, h, c, steps=4)[1])["kernel"]))
  assert np.abs(latents[0] - latents[1]).max() > 1e-4
  assert np.abs(latents[1] - latents[2]).max() > 1e-4


def test_readings_coincide_without_momentum():
  w0, h, c = problem()
  states = [run(blaq_jax.blaq(LR, a=0.6, b1=0.0, blend=b), w0, h, c, 5)[1]
            for b in ("moments", "lookahead", "gradients")]
  for other in states[1:]:  # to float32 rounding (atol: entries near 0)
    chex.assert_trees_all_close(blaq_jax.latent_params(states[0]),
                                blaq_jax.latent_params(other), rtol=1e-6,
                                atol=1e-8)


@pytest.mark.parametrize("blend", ["moments", "lookahead"])
def test_a_one_is_laq_bit_for_bit(blend):
  w0, h, c = problem()
  p_laq, s_laq = run(blaq_jax.laq(LR), w0, h, c, 5)
  p_blaq, s_blaq = run(blaq_jax.blaq(LR, a=1.0, blend=blend), w0, h, c, 5)
  chex.assert_trees_all_equal(p_laq, p_blaq)
  chex.assert_trees_all_equal(blaq_jax.latent_params(s_laq),
                              blaq_jax.latent_params(s_blaq))


@pytest.mark.parametrize("blend", ["moments", "lookahead"])
def test_a_constant_one_takes_no_trial_gradient(blend):
  w0, h, c = problem()
  calls = []
  loss = lambda p: 0.5 * jnp.sum(h * (p["kernel"] - c) ** 2)  # noqa: E731
  opt = blaq_jax.blaq(LR, a=1.0, blend=blend)
  params = {"kernel": jnp.asarray(w0, jnp.float32)}
  state = opt.init(params)
  _, state = opt.update(jax.grad(loss)(params), state, params,
                        grad_fn=lambda p: calls.append(1) or jax.grad(loss)(p))
  assert not calls
  assert int(blaq_jax.step_cost(state).gradient_evaluations) == 1


@pytest.mark.parametrize("blend", ["moments", "lookahead"])
def test_a_schedule_at_one_runs_the_trial_and_reduces_to_laq(blend):
  """The backtrack's formulas at a = 1 (a schedule: the trial is traced)."""
  w0, h, c = problem()
  _, s_laq = run(blaq_jax.laq(LR), w0, h, c, 5)
  _, s_blaq = run(blaq_jax.blaq(LR, a=lambda count: 1.0, blend=blend),
                  w0, h, c, 5)
  assert int(blaq_jax.step_cost(s_blaq).gradient_evaluations) == 2
  chex.assert_trees_all_close(blaq_jax.latent_params(s_laq),
                              blaq_jax.latent_params(s_blaq), rtol=1e-6)


def test_a_one_gradients_reading_is_laq_without_momentum():
  w0, h, c = problem()
  _, s_blaq = run(blaq_jax.blaq(LR, a=1.0, blend="gradients"), w0, h, c, 1)
  # One step: the direction is g itself, D of the real gradient.
  w, _ = np_run(w0, lambda q: h * (q - c), steps=1, active_from=0,
                blend="gradients", a=1.0, b1=0.9)
  np.testing.assert_allclose(blaq_jax.latent_params(s_blaq)["kernel"], w,
                             rtol=2e-5, atol=1e-6)


def test_transparent_mode_takes_the_same_step_in_two_calls():
  w0, h, c = problem()
  loss = lambda p: 0.5 * jnp.sum(h * (p["kernel"] - c) ** 2)  # noqa: E731
  for blend in ("lookahead", "gradients"):
    opaque = run(blaq_jax.blaq(LR, blend=blend), w0, h, c, 2)[1]
    opt = blaq_jax.blaq(LR, blend=blend, opaque=False)
    params = {"kernel": jnp.asarray(w0, jnp.float32)}
    state = opt.init(params)
    params = blaq_jax.quantized_params(params, state)
    for _ in range(4):  # two active steps, two calls each
      updates, state = opt.update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(blaq_jax.latent_params(state)["kernel"],
                               blaq_jax.latent_params(opaque)["kernel"],
                               rtol=1e-5, atol=1e-7)
    assert int(state.count) == 2
