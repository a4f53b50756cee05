"""STE quantizers and the STE family (ste, BinaryConnect, BWN, TWN)."""

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
from blaq_jax.alias import guarded_adam
from problems import mlp_problem, train_mlp

ALL = lambda path, leaf: True  # quantize every leaf  # noqa: E731


# --- independent numpy references ---------------------------------------------

def np_surrogate_grad(name, x):
  return {"identity": np.ones_like(x),
          "hardtanh": (np.abs(x) <= 1).astype(np.float64),
          "tanh": 1 / np.cosh(x) ** 2,
          "approx_sign": np.where(np.abs(x) <= 1, 2 - 2 * np.abs(x), 0.0)}[name]


def np_nearest(x, values):
  return values[np.argmin(np.abs(x[..., None] - values), axis=-1)]


def np_quantize(w, values, scale, beta0=None):
  """(alpha, beta) of a per-tensor scale rule, straight from the papers."""
  a = np.abs(w)
  if isinstance(scale, float):
    return scale, np_nearest(w / scale, values)
  if scale == "twn":
    above = a > 0.7 * a.mean()
    return a[above].mean(), np.where(above, np.sign(w), 0.0)
  if len(values) == 2:  # "fit" at 1 bit: BWN
    return a.mean(), np.where(w < 0, -1.0, 1.0)
  beta = np_nearest(w / a.max(), values) if beta0 is None else beta0
  alpha_old = np.inf
  for _ in range(100):
    alpha = np.sum(beta * w) / np.sum(beta * beta)
    beta = np_nearest(w / alpha, values)
    if abs(alpha - alpha_old) < 1e-7:
      break
    alpha_old = alpha
  return alpha, beta


METHODS = {
    "bc": (lambda: blaq_jax.binary_connect(0.05), LevelSet("blaq", 1)),
    "bwn": (lambda: blaq_jax.bwn(0.05), LevelSet("blaq", 1)),
    "bwn_channel": (lambda: blaq_jax.bwn(0.05, channel_axis=-1),
                    LevelSet("blaq", 1)),
    "twn": (lambda: blaq_jax.twn(0.05), LevelSet("linear", 2)),
    "ste_uniform3": (lambda: blaq_jax.ste(0.05, quantizer="uniform", bits=3),
                     LevelSet("linear", 3)),
    "ste_blaq2_tanh": (lambda: blaq_jax.ste(
        0.05, quantizer="uniform", bits=2, level_set="blaq",
        surrogate="tanh", scale="max"), LevelSet("blaq", 2)),
    "ste_sign_approx": (lambda: blaq_jax.ste(
        0.05, surrogate="approx_sign", scale=0.2), LevelSet("blaq", 1)),
}


# --- quantizers ----------------------------------------------------------------

@pytest.mark.parametrize("name", quantizers.SURROGATES)
def test_surrogate_grad_matches_formula(name):
  x = np.linspace(-2.5, 2.5, 41)
  np.testing.assert_allclose(quantizers.surrogate_grad(name, x),
                             np_surrogate_grad(name, x), rtol=1e-6)


@pytest.mark.parametrize("name", quantizers.SURROGATES)
def test_surrogate_grad_with_a_scale_is_that_of_the_normalised_latent(name):
  # hardtanh compares |w| <= alpha instead of dividing: the same mask,
  # including |w| = alpha (here exact: alpha a power of two).
  alpha = np.float32(0.25)
  w = (np.linspace(-2.5, 2.5, 41) * alpha).astype(np.float32)
  np.testing.assert_allclose(quantizers.surrogate_grad(name, w, alpha),
                             np_surrogate_grad(name, w / alpha), rtol=1e-6)


@pytest.mark.parametrize("name", quantizers.SURROGATES)
def test_noise_has_unit_variance_and_smooths_the_quantizer_into_s(name):
  """E[Q(x + eps_bar u)] = S(x): the eps_bar table and the noise match."""
  n = 200_000
  u = np.asarray(quantizers.sample_noise(name, jax.random.PRNGKey(1), (n,)),
                 np.float64)
  se = 5 / math.sqrt(n)  # 5 standard errors of a unit-variance mean
  assert abs(u.mean()) < se
  assert abs(u.var() - 1) < 5 * np.std(u ** 2) / math.sqrt(n)
  e = quantizers.EPS_BAR[name]
  for x in (-1.3, -0.4, 0.0, 0.25, 0.8):
    if name == "identity":  # round, whose smoothing is the identity
      samples, expected = np.round(x + e * u), x
    else:  # sign
      samples = np.where(x + e * u < 0, -1.0, 1.0)
      expected = {"hardtanh": np.clip(x, -1, 1), "tanh": np.tanh(x),
                  "approx_sign": (x * (2 - abs(x)) if abs(x) <= 1
                                  else np.sign(x))}[name]
    tol = 5 * max(samples.std(), 1e-3) / math.sqrt(n)
    assert abs(samples.mean() - expected) < tol, (x, samples.mean(), expected)


@pytest.mark.parametrize("name", quantizers.SURROGATES)
def test_fake_quantize_forward_and_custom_vjp(name):
  w = jax.random.normal(jax.random.key(0), (5, 4))
  ls = LevelSet("linear", 3)
  q = quantizers.fake_quantize(w, ls, scale="max", surrogate=name)
  alpha = float(jnp.max(jnp.abs(w)))
  np.testing.assert_allclose(q, alpha * np_nearest(np.asarray(w) / alpha,
                                                   ls.values), rtol=1e-6)
  g = jax.random.normal(jax.random.key(1), w.shape)
  grad = jax.grad(lambda w: jnp.vdot(g, quantizers.fake_quantize(
      w, ls, scale="max", surrogate=name)))(w)
  np.testing.assert_allclose(
      grad, g * np_surrogate_grad(name, np.asarray(w) / alpha), rtol=1e-5,
      atol=1e-7)


def test_named_quantizers():
  w = jnp.array([[0.75, -0.0625], [0.125, -0.5]])
  np.testing.assert_array_equal(quantizers.ternary(w),
                                [[0.625, 0.0], [0.0, -0.625]])
  np.testing.assert_allclose(quantizers.sign(w), np.where(w < 0, -1, 1) *
                             np.abs(w).mean(), rtol=1e-6)
  np.testing.assert_array_equal(quantizers.sign(w, scale=1.0),
                                np.where(w < 0, -1.0, 1.0))
  q = quantizers.uniform(w, 3, scale="max")  # grid step 0.75 / 3
  np.testing.assert_allclose(q, [[0.75, 0.0], [0.0, -0.5]], rtol=1e-6)


def test_twn_rule_per_channel_matches_numpy():
  w = np.asarray(jax.random.normal(jax.random.key(2), (6, 4)))
  alpha, codes = quantizers.quantize_latent(w, LevelSet("linear", 2), "twn",
                                            channel_axis=-1)
  for c in range(4):
    a_ref, b_ref = np_quantize(w[:, c], LevelSet("linear", 2).values, "twn")
    assert float(alpha[c]) == pytest.approx(a_ref, rel=1e-6)
    np.testing.assert_array_equal(LevelSet("linear", 2).decode(codes[:, c]),
                                  b_ref)


def test_all_zero_tensor_keeps_a_finite_positive_scale():
  for scale in ("fit", "twn", "max"):
    alpha, codes = quantizers.quantize_latent(
        jnp.zeros((3, 3)), LevelSet("linear", 2), scale)
    assert float(alpha) > 0 and np.all(
        LevelSet("linear", 2).decode(codes) == 0)


def test_unknown_surrogate_and_scale_are_rejected():
  with pytest.raises(ValueError, match="surrogate='hard_tanh'"):
    quantizers.sign(jnp.ones(3), surrogate="hard_tanh")
  with pytest.raises(ValueError, match="scale"):
    quantizers.quantize_latent(jnp.ones(3), LevelSet("blaq", 1), "median")
  with pytest.raises(ValueError, match="scale"):
    quantizers.check_scale(-1.0)


# --- the transforms ------------------------------------------------------------

@pytest.mark.parametrize("method,scale,values,surrogate,clip", [
    ("bc", 1.0, LevelSet("blaq", 1).values, "hardtanh", 1.0),
    ("bwn", "fit", LevelSet("blaq", 1).values, "identity", None),
    ("twn", "twn", LevelSet("linear", 2).values, "identity", None),
    ("ste", "fit", LevelSet("linear", 3).values, "tanh", None),
])
def test_one_sgd_step_matches_numpy(method, scale, values, surrogate, clip):
  """w1 = w0 - lr g S'(w0 / alpha0), q1 = Q(w1), updates = q1 - q0."""
  lr = 0.3
  rng = np.random.default_rng(0)
  w0 = rng.normal(scale=0.6, size=(4, 6)).astype(np.float32)
  target = rng.normal(scale=0.6, size=(4, 6)).astype(np.float32)
  kw = dict(optimizer=optax.sgd(lr), quantize=ALL)
  opt = {"bc": lambda: blaq_jax.binary_connect(None, **kw),
         "bwn": lambda: blaq_jax.bwn(None, **kw),
         "twn": lambda: blaq_jax.twn(None, **kw),
         "ste": lambda: blaq_jax.ste(None, quantizer="uniform", bits=3,
                                     surrogate="tanh", **kw)}[method]()
  params = {"w": jnp.asarray(w0)}
  state = opt.init(params)
  alpha0, beta0 = np_quantize(w0.astype(np.float64), values, scale)
  q0 = alpha0 * beta0
  np.testing.assert_allclose(blaq_jax.quantized_params(params, state)["w"],
                             q0, rtol=1e-5, atol=1e-7)
  params = {"w": jnp.asarray(q0, jnp.float32)}
  g = 2 * (q0 - target)
  updates, state = opt.update({"w": jnp.asarray(g, jnp.float32)}, state,
                              params)
  w1 = w0 - lr * g * np_surrogate_grad(surrogate, w0 / alpha0)
  if clip is not None:
    w1 = np.clip(w1, -clip, clip)
  np.testing.assert_allclose(blaq_jax.latent_params(state)["w"], w1,
                             rtol=1e-5, atol=1e-6)
  alpha1, beta1 = np_quantize(w1, values, scale, beta0)
  np.testing.assert_allclose(optax.apply_updates(params, updates)["w"],
                             alpha1 * beta1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_params_are_on_the_level_set_after_every_step(name):
  make, level_set = METHODS[name]
  opt = make()
  params, loss, _ = mlp_problem()
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)
  step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p))
  flips = []
  for _ in range(6):
    old_codes = jax.tree.leaves(blaq_jax.codes(state))
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    flips.append(sum(int(jnp.sum(a != b)) for a, b in zip(
        old_codes, jax.tree.leaves(blaq_jax.codes(state)))))
    for layer in ("l1", "l2"):
      qt = blaq_jax.quantized_tensors(state)[layer]["kernel"]
      assert qt.level_set == level_set
      exact = np.asarray(qt.dequantize())
      q = np.asarray(params[layer]["kernel"])
      np.testing.assert_allclose(q, exact, rtol=0,
                                 atol=np.spacing(np.abs(exact).max()))
      alpha = np.asarray(qt.alpha)
      assert np.all(alpha > 0)
      beta = exact / (alpha if alpha.ndim == 0 else alpha[None, :])
      assert np.all(np.min(np.abs(beta[..., None] - level_set.values), -1)
                    < 1e-6)
  assert max(flips) > 0  # the weights did move between levels


def test_full_precision_leaves_follow_the_inner_optimizer():
  params, loss, _ = mlp_problem()
  grads = jax.grad(loss)(params)
  for inner in (None, optax.sgd(0.1, momentum=0.9)):
    opt = blaq_jax.bwn(0.01, optimizer=inner)
    ref = optax.adam(0.01) if inner is None else inner
    u, _ = opt.update(grads, opt.init(params), params)
    ur, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(u["l1"]["bias"], ur["l1"]["bias"], rtol=1e-6)


def test_per_leaf_bits_default_selection_and_accessors():
  params, loss, _ = mlp_problem()
  rule = lambda path, leaf: (8 if "l1" in blaq_jax.path_str(path) and  # noqa
                             blaq_jax.default_quantize(path, leaf)
                             else blaq_jax.default_quantize(path, leaf))
  opt = blaq_jax.twn(0.01, quantize=rule)
  _, state = train_mlp(opt, steps=2)
  qt = blaq_jax.quantized_tensors(state)
  assert qt["l1"]["kernel"].level_set == LevelSet("linear", 8)
  assert qt["l2"]["kernel"].level_set == LevelSet("linear", 2)
  assert isinstance(qt["l1"]["bias"], optax.MaskedNode)
  assert isinstance(blaq_jax.latent_params(state)["l2"]["bias"],
                    optax.MaskedNode)
  codes = blaq_jax.codes(state)["l2"]["kernel"]
  assert codes.dtype == jnp.uint8 and codes.shape == (16, 3)
  # sign at a 1-bit leaf of a multi-bit STE
  opt = blaq_jax.ste(0.01, quantizer="uniform", bits=4, quantize=lambda p, x: (
      1 if "l2" in blaq_jax.path_str(p) else blaq_jax.default_quantize(p, x)))
  qt = blaq_jax.quantized_tensors(opt.init(params))
  assert qt["l2"]["kernel"].level_set == LevelSet("blaq", 1)
  assert qt["l1"]["kernel"].level_set == LevelSet("linear", 4)
  del loss


def test_binary_connect_clips_the_latent_weights():
  _, state = train_mlp(blaq_jax.binary_connect(0.5), steps=5)
  latent = blaq_jax.latent_params(state)
  for layer in ("l1", "l2"):
    w = np.asarray(latent[layer]["kernel"])
    assert np.abs(w).max() <= 1.0 and np.isclose(np.abs(w).max(), 1.0)
    np.testing.assert_array_equal(blaq_jax.scales(state)[layer]["kernel"], 1)


def test_inject_hyperparams_gives_identical_updates():
  params, loss, _ = mlp_problem()
  plain = blaq_jax.ste(0.02, quantizer="ternary", clip_latent=1.0)
  injected = optax.inject_hyperparams(blaq_jax.ste)(
      learning_rate=0.02, quantizer="ternary", clip_latent=1.0)
  p1, s1 = params, plain.init(params)
  p2, s2 = params, injected.init(params)
  for _ in range(3):
    u1, s1 = plain.update(jax.grad(loss)(p1), s1, p1)
    u2, s2 = injected.update(jax.grad(loss)(p2), s2, p2)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-7)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  # the learning rate can be changed between steps through the state
  s2.hyperparams["learning_rate"] = jnp.asarray(0.0)
  u2, _ = injected.update(jax.grad(loss)(p2), s2, p2)
  np.testing.assert_allclose(u2["l1"]["bias"], 0.0, atol=0)
  with pytest.raises(TypeError, match="static"):
    optax.inject_hyperparams(blaq_jax.ste)(0.01, quantizer="uniform",
                                           bits=3).init(params)


def test_chain_with_optax_wrappers():
  opt = optax.chain(optax.clip_by_global_norm(0.1),
                    blaq_jax.bwn(0.05, diagnostics=True))
  params, state = train_mlp(opt, steps=4)
  qt = blaq_jax.quantized_tensors(state)["l1"]["kernel"]
  np.testing.assert_allclose(params["l1"]["kernel"], qt.dequantize(),
                             rtol=0, atol=1e-6)
  assert 0 <= float(optax.tree.get(state, "flip_fraction")) <= 1
  assert -1 <= float(optax.tree.get(state, "update_cosine")) <= 1


def test_bad_input_errors():
  params, loss, _ = mlp_problem()
  with pytest.raises(ValueError, match="surrogate='htanh'"):
    blaq_jax.ste(0.01, surrogate="htanh")
  with pytest.raises(ValueError, match="surrogate='nope'"):
    blaq_jax.bwn(0.01, surrogate="nope")
  with pytest.raises(ValueError, match="quantizer='round'"):
    blaq_jax.ste(0.01, quantizer="round")
  with pytest.raises(ValueError, match="bits=3"):
    blaq_jax.ste(0.01, quantizer="sign", bits=3)
  with pytest.raises(ValueError, match="bits=9"):
    blaq_jax.ste(0.01, quantizer="uniform", bits=9)
  with pytest.raises(ValueError, match="scale"):
    blaq_jax.ste(0.01, scale="mode")
  with pytest.raises(TypeError, match="scale must be one of .* or a positive "
                     "float, got None"):
    blaq_jax.ste(0.01, scale=None)
  with pytest.raises(ValueError, match="level_set"):
    blaq_jax.ste(0.01, quantizer="uniform", level_set="nf4")
  with pytest.raises(ValueError, match="clip_latent"):
    blaq_jax.binary_connect(0.01, clip_latent=0.0)
  with pytest.raises(ValueError, match="learning_rate or an optimizer"):
    blaq_jax.ste(None)
  opt = blaq_jax.bwn(0.01)
  state = opt.init(params)
  with pytest.raises(ValueError, match="needs params"):
    opt.update(jax.grad(loss)(params), state)
  with pytest.raises(ValueError, match="l2/bias"):
    opt.update({"l1": params["l1"]}, state, params)
  with pytest.raises(ValueError, match="another config"):
    blaq_jax.twn(0.01).update(jax.grad(loss)(params), state, params)


@pytest.mark.parametrize("lr", [0.05, optax.linear_schedule(0.1, 0.01, 4)])
def test_guarded_adam_is_optax_adam(lr):
  # The STE family's default inner optimizer: optax.adam's state and
  # numbers, plus a finite flag that keeps the state.
  params = {"w": jnp.array([0.3, -0.2, 0.1]), "b": jnp.zeros(2)}
  ours, ref = guarded_adam(lr), optax.adam(lr)
  s_ours, s_ref = ours.init(params), ref.init(params)
  chex.assert_trees_all_equal_structs(s_ours, s_ref)
  for k in range(4):
    g = jax.tree.map(lambda x: jnp.cos(x + k) + 0.1, params)
    u_ours, s_ours = ours.update(g, s_ours, params, finite=True)
    u_ref, s_ref = ref.update(g, s_ref, params)
    chex.assert_trees_all_close(u_ours, u_ref, rtol=1e-6)
    chex.assert_trees_all_close(s_ours, s_ref, rtol=1e-6)
  bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), g)
  u, kept = ours.update(bad, s_ours, params, finite=jnp.array(False))
  chex.assert_trees_all_equal(kept, s_ours)
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
