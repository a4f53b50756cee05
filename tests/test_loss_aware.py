"""LAQ and BLAQ against known answers (METHOD.md formulas, toy losses).

BLAQ runs in the ``"moments"`` reading here (METHOD.md's BLAQ step);
tests/test_blaq_readings.py covers the three readings.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax
from blaq_jax.levels import LevelSet
from problems import fig1_loss
from problems import three_halves_curvature as toy_curv
from problems import three_halves_loss as toy_loss

B1, B2, EPS = 0.9, 0.999, 1e-8
ALL = lambda path, leaf: True  # quantize every leaf  # noqa: E731


# --- independent numpy reference of METHOD.md ------------------------------

def np_nearest(x, values):
  return values[np.argmin(np.abs(x[..., None] - values), axis=-1)]


def np_project(w, d, values, beta):
  """Algorithm 2: exact for binary, else alternate from ``beta``."""
  if len(values) == 2:
    return np.sum(d * np.abs(w)) / np.sum(d), np.where(w < 0, -1.0, 1.0)
  alpha_old = np.inf
  for _ in range(100):
    alpha = np.sum(d * beta * w) / np.sum(d * beta * beta)
    beta = np_nearest(w / alpha, values)
    if abs(alpha - alpha_old) < 1e-6:
      break
    alpha_old = alpha
  return alpha, beta


def np_laq_or_blaq_step(w0, q0, beta0, grad, lr, values, a=None):
  """First step (t = 1) from zero moments; ``a=None`` is LAQ."""
  g = grad(q0)
  m, v = (1 - B1) * g, (1 - B2) * g * g
  mhat, vhat = m / (1 - B1), v / (1 - B2)
  d = (EPS + np.sqrt(vhat)) / lr
  if a is not None:
    alpha_s, beta_s = np_project(w0 - mhat / d, d, values, beta0)
    g_s = grad(alpha_s * beta_s)
    m_s, v_s = B1 * m + (1 - B1) * g_s, B2 * v + (1 - B2) * g_s * g_s
    mhat_s, vhat_s = m_s / (1 - B1 ** 2), v_s / (1 - B2 ** 2)
    d_s = (EPS + np.sqrt(vhat_s)) / lr
    mhat, d = a * mhat + (1 - a) * mhat_s, a * d + (1 - a) * d_s
  w1 = w0 - mhat / d
  alpha, beta = np_project(w1, d, values, beta0)
  return w1, alpha * beta


@pytest.mark.parametrize("bits,level_set", [(1, "blaq"), (2, "blaq"),
                                            (2, "linear")])
@pytest.mark.parametrize("method", ["laq", "blaq"])
def test_one_step_on_quadratic_matches_numpy(method, bits, level_set):
  rng = np.random.default_rng(0)
  w0 = rng.normal(scale=0.3, size=(4, 6)).astype(np.float32)
  h = rng.uniform(0.5, 4.0, size=w0.shape).astype(np.float32)
  c = rng.normal(scale=0.3, size=w0.shape).astype(np.float32)
  loss = lambda p: 0.5 * jnp.sum(h * (p["kernel"] - c) ** 2)
  lr = 0.01
  kw = dict(bits=bits, level_set=level_set)
  opt = (blaq_jax.laq(lr, **kw) if method == "laq"
         else blaq_jax.blaq(lr, a=0.6, **kw, blend="moments"))
  params = {"kernel": jnp.asarray(w0)}
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)
  q0 = np.asarray(params["kernel"], np.float64)
  values = LevelSet(level_set, bits).values.astype(np.float64)
  beta0 = values[np.asarray(blaq_jax.codes(state)["kernel"])]
  updates, state = opt.update(jax.grad(loss)(params), state, params,
                              grad_fn=jax.grad(loss))
  new = optax.apply_updates(params, updates)
  w1, q1 = np_laq_or_blaq_step(
      w0.astype(np.float64), q0, beta0, lambda q: h * (q - c), lr, values,
      a=0.6 if method == "blaq" else None)
  np.testing.assert_allclose(blaq_jax.latent_params(state)["kernel"], w1,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new["kernel"], q1, rtol=1e-5, atol=1e-7)


def test_laq_and_blaq_steps_differ():
  """Guards the test above against a BLAQ that silently does LAQ's step."""
  loss = lambda p: jnp.sum((p["kernel"] - jnp.array([[0.3, -0.1]])) ** 2)
  params = {"kernel": jnp.array([[0.05, 0.2]])}
  outs = []
  for opt in (blaq_jax.laq(0.1), blaq_jax.blaq(0.1, a=0.6, blend="moments")):
    state = opt.init(params)
    outs.append(blaq_jax.latent_params(opt.update(
        jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss))[1]))
  assert not np.allclose(outs[0]["kernel"], outs[1]["kernel"])


# --- f(w) = c |w|^(3/2) with exact Newton curvature ------------------------

def run_toy(opt, w0, steps):
  params = {"w": jnp.asarray(w0, jnp.float32)}
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)
  qs = [float(params["w"])]
  for _ in range(steps):
    updates, state = opt.update(jax.grad(toy_loss)(params), state, params,
                                grad_fn=jax.grad(toy_loss),
                                curvature_fn=toy_curv)
    params = optax.apply_updates(params, updates)
    qs.append(float(params["w"]))
  return np.array(qs)


def test_laq_oscillates_forever_on_three_halves_power():
  # Newton on |w|^(3/2) from q0: w1 = q0 - g/H = q0 - 2 q0 = -q0 (appendix).
  qs = run_toy(blaq_jax.laq(1.0, b1=0.0, quantize=ALL), 0.5, 12)
  np.testing.assert_allclose(qs, 0.5 * (-1.0) ** np.arange(13), rtol=1e-6)


@pytest.mark.parametrize("a", [0.6, 0.9])
def test_blaq_does_not_oscillate_on_three_halves_power(a):
  # Trial: q* = -q_t, g* = -g, H* = H, so the blended step is (2a - 1) g / H
  # = 2 (2a - 1) q_t and q_{t+1} = (3 - 4a) q_t: no sign flip for a < 3/4,
  # and |3 - 4a| < 1 for 1/2 < a < 1: convergence to the minimum at 0.
  qs = run_toy(blaq_jax.blaq(1.0, b1=0.0, a=a, quantize=ALL, blend="moments"), 0.5, 12)
  np.testing.assert_allclose(qs, 0.5 * (3 - 4 * a) ** np.arange(13),
                             rtol=1e-4, atol=1e-9)
  assert abs(qs[-1]) < 0.5 * abs(qs[0])


# --- the paper's Figure 1 loss ----------------------------------------------

def run_fig1(opt, steps=300):
  params = {"w": jnp.array([-0.06, 0.04])}
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)
  step = jax.jit(lambda g, s, p: opt.update(g, s, p,
                                            grad_fn=jax.grad(fig1_loss)))
  codes, latents = [], []
  for _ in range(steps):
    updates, state = step(jax.grad(fig1_loss)(params), state, params)
    params = optax.apply_updates(params, updates)
    codes.append(np.asarray(blaq_jax.codes(state)["w"]))
    latents.append(np.asarray(blaq_jax.latent_params(state)["w"]))
  codes, latents = np.array(codes), np.array(latents)
  flips = int(np.sum(codes[1:] != codes[:-1]))
  moves = np.diff(latents, axis=0)
  reversals = int(np.sum(np.sign(moves[1:]) * np.sign(moves[:-1]) < 0))
  return params["w"], flips, reversals


def test_figure1_both_converge_to_quantized_optimum():
  # On {alpha (1, -1)} the loss is 5 (alpha - .054)^2 + (.055 - alpha)^2,
  # minimised at alpha = (5 * .054 + .055) / 6.
  alpha_star = (5 * 0.054 + 0.055) / 6
  for name, opt in (("LAQ", blaq_jax.laq(0.005, quantize=ALL)),
                    ("BLAQ", blaq_jax.blaq(0.005, a=0.6, quantize=ALL, blend="moments"))):
    q, flips, reversals = run_fig1(opt)
    np.testing.assert_allclose(q, [alpha_star, -alpha_star], rtol=1e-3)
    print(f"Figure 1 toy, {name}: {flips} code flips, {reversals} latent "
          "direction reversals in 300 steps")


# --- equivalences ------------------------------------------------------------

def mlp_problem(seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  params = {"l1": {"kernel": jax.random.normal(k1, (8, 16)) * 0.3,
                   "bias": jnp.zeros(16)},
            "l2": {"kernel": jax.random.normal(k2, (16, 3)) * 0.3,
                   "bias": jnp.zeros(3)}}
  x = jax.random.normal(k3, (32, 8))
  y = jax.random.randint(k4, (32,), 0, 3)

  def loss(p):
    h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    logits = h @ p["l2"]["kernel"] + p["l2"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss


def run(opt, steps=8, seed=0, jit=True, **kw):
  params, loss = mlp_problem(seed)
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)
  step = lambda p, s: opt.update(jax.grad(loss)(p), s, p,
                                 grad_fn=jax.grad(loss), **kw)
  step = jax.jit(step) if jit else step
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("jit", [False, True])
def test_blaq_with_a_equal_one_is_exactly_laq(bits, jit):
  # A constant a = 1 takes LAQ's step itself (the trial would have weight 0),
  # so the two agree bit for bit under jit too, whatever XLA fuses.
  p_laq, s_laq = run(blaq_jax.laq(0.01, bits=bits), jit=jit)
  p_blaq, s_blaq = run(blaq_jax.blaq(0.01, bits=bits, a=1.0,
                                     blend="moments"), jit=jit)
  chex.assert_trees_all_equal(p_laq, p_blaq)
  chex.assert_trees_all_equal(blaq_jax.latent_params(s_laq),
                              blaq_jax.latent_params(s_blaq))


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("blend", ["moments", "lookahead"])
def test_blaq_backtrack_at_a_one_is_laq_op_by_op(bits, blend):
  # An a schedule at 1 runs the trial and the backtrack; run op by op (no
  # jit, so nothing is fused) on the same gradients, their blended latent
  # step is LAQ's bit for bit. The scales agree to 1e-6: an active step sums
  # its D_bar in blocks of 8, LAQ in blocks of 16, and at 2 bits its real
  # projection runs one more round, from q*'s scale (the next test).
  params, loss = mlp_problem()
  grads = [jax.grad(loss)(jax.tree.map(lambda x: x * (1 + 0.1 * k), params))
           for k in range(4)]

  def go(opt):
    state = opt.init(params)
    p = blaq_jax.quantized_params(params, state)
    for g in grads:
      updates, state = opt.update(g, state, p, grad_fn=jax.grad(loss))
      p = optax.apply_updates(p, updates)
    return p, state

  p_laq, s_laq = go(blaq_jax.laq(0.01, bits=bits))
  p_blaq, s_blaq = go(blaq_jax.blaq(0.01, bits=bits, a=lambda count: 1.0,
                                    blend=blend))
  assert int(blaq_jax.step_cost(s_blaq).gradient_evaluations) == 2
  chex.assert_trees_all_equal(blaq_jax.latent_params(s_laq),
                              blaq_jax.latent_params(s_blaq))
  chex.assert_trees_all_equal(blaq_jax.codes(s_laq), blaq_jax.codes(s_blaq))
  chex.assert_trees_all_close(p_laq, p_blaq, rtol=1e-6, atol=0)


def np_rounds(w, d, values, alpha, rounds):
  """``rounds`` plain alternations from ``alpha`` (Algorithm 2's rounds)."""
  for _ in range(rounds):
    beta = np_nearest(w / alpha, values)
    alpha = np.sum(d * beta * w) / np.sum(d * beta * beta)
  return alpha


@pytest.mark.parametrize("static", [True, False])
def test_blaq_real_projection_continues_from_the_trial_scale(static):
  # First step after init at 2 bits, an a schedule at 1: w_{t+1} = w* and
  # D_bar = D_t, so the trial and the real step project the same problem.
  # Opaque and statically active, the real projection continues from q*'s
  # scale for one round (2 + 1 rounds in all); under a traced schedule
  # (lax.cond) it runs LAQ's 2 rounds from q_t's scale. The third round moves
  # the scale by far more than the tolerance, so the two are told apart.
  rng = np.random.default_rng(3)
  w0 = rng.normal(scale=0.3, size=(64, 48)).astype(np.float32)
  c = rng.normal(scale=0.3, size=w0.shape).astype(np.float32)
  loss = lambda p: 0.5 * jnp.sum((p["kernel"] - c) ** 2)  # noqa: E731
  lr = 0.05
  opt = blaq_jax.blaq(lr, bits=2, a=lambda count: 1.0,
                      active=1 if static else (lambda count: count >= 0))
  params = {"kernel": jnp.asarray(w0)}
  state = opt.init(params)
  alpha0 = float(blaq_jax.quantized_tensors(state)["kernel"].alpha)
  params = blaq_jax.quantized_params(params, state)
  g = np.asarray(jax.grad(loss)(params)["kernel"], np.float64)
  _, state = opt.update(jax.grad(loss)(params), state, params,
                        grad_fn=jax.grad(loss))
  w1 = w0 - lr * g / (EPS + np.abs(g))  # t = 1: m_hat = g, sqrt(v_hat) = |g|
  d = EPS + np.abs(g)
  values = LevelSet("blaq", 2).values.astype(np.float64)
  three, two = (np_rounds(w1, d, values, alpha0, r) for r in (3, 2))
  assert abs(three / two - 1) > 1e-4
  np.testing.assert_allclose(blaq_jax.latent_params(state)["kernel"], w1,
                             rtol=1e-5, atol=1e-6)  # g in float32
  got = float(blaq_jax.quantized_tensors(state)["kernel"].alpha)
  np.testing.assert_allclose(got, three if static else two, rtol=1e-6)


def test_blaq_never_active_is_exactly_laq_and_traces_no_trial():
  calls = []

  def spy_grad_fn(p):
    calls.append(1)
    return p

  params, loss = mlp_problem()
  opt = blaq_jax.blaq(0.01, active=blaq_jax.never, blend="moments")
  state = opt.init(params)
  updates, _ = opt.update(jax.grad(loss)(params), state, params,
                          grad_fn=spy_grad_fn)
  assert not calls  # never even traced
  ref_updates, _ = blaq_jax.laq(0.01).update(
      jax.grad(loss)(params), blaq_jax.laq(0.01).init(params), params)
  chex.assert_trees_all_equal(updates, ref_updates)
  # A traced schedule goes through lax.cond, whose branches XLA compiles
  # (and may reassociate): one step agrees to float rounding.
  p_laq, _ = run(blaq_jax.laq(0.01), steps=1)
  p_never, _ = run(blaq_jax.blaq(0.01, active=lambda step: step < 0, blend="moments"),
                   steps=1)
  chex.assert_trees_all_close(p_laq, p_never, rtol=1e-6, atol=1e-7)


def test_schedule_gates_the_trial_with_cond():
  # Traced schedule (period 3): active on steps 0, 3, 6 only.
  _, state = run(blaq_jax.blaq(0.01, active=3, diagnostics=True, blend="moments"), steps=1)
  assert bool(optax.tree.get(state, "trial_active"))
  _, state = run(blaq_jax.blaq(0.01, active=3, diagnostics=True, blend="moments"), steps=2)
  assert not bool(optax.tree.get(state, "trial_active"))
  _, state = run(blaq_jax.blaq(0.01, active=3, diagnostics=True, blend="moments"), steps=4)
  assert bool(optax.tree.get(state, "trial_active"))


def test_inactive_steps_compute_no_trial_gradient_under_jit():
  """The trial gradient sits in a lax.cond branch that is not executed."""
  params, loss = mlp_problem()
  opt = blaq_jax.blaq(0.01, active=2, blend="moments")
  state = opt.init(params)
  counter = []
  def counting_grad_fn(p):
    jax.debug.callback(lambda: counter.append(1))
    return jax.grad(loss)(p)
  step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p,
                                         grad_fn=counting_grad_fn))
  for _ in range(4):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  jax.effects_barrier()
  assert len(counter) == 2  # steps 0 and 2


def test_params_are_on_the_level_set_after_every_update():
  for opt, kind, bits in ((blaq_jax.laq(0.01, bits=2), "blaq", 2),
                          (blaq_jax.blaq(0.01, bits=3, level_set="linear",
                                         channel_axis=-1, blend="moments"), "linear", 3)):
    params, loss = mlp_problem()
    state = opt.init(params)
    values = LevelSet(kind, bits).values
    for _ in range(5):
      updates, state = opt.update(jax.grad(loss)(params), state, params,
                                  grad_fn=jax.grad(loss))
      params = optax.apply_updates(params, updates)
      for name in ("l1", "l2"):
        qt = blaq_jax.quantized_tensors(state)[name]["kernel"]
        q = np.asarray(params[name]["kernel"])
        exact = np.asarray(qt.dequantize())
        np.testing.assert_allclose(q, exact, rtol=0, atol=np.spacing(
            np.abs(exact).max()))
        alpha = np.asarray(qt.alpha)
        beta = exact / alpha
        assert np.all(np.min(np.abs(beta[..., None] - values), -1) < 1e-5)
        assert np.all(alpha > 0)


def test_diagnostics_are_readable_and_sane():
  _, state = run(blaq_jax.blaq(0.05, diagnostics=True, blend="moments"), steps=6)
  flip = float(optax.tree.get(state, "flip_fraction"))
  cos = float(optax.tree.get(state, "update_cosine"))
  assert 0.0 <= flip <= 1.0 and -1.0 <= cos <= 1.0
  assert bool(optax.tree.get(state, "trial_active"))
  assert -1.0 <= float(optax.tree.get(state, "trial_grad_cosine")) <= 1.0
  # A constant gradient gives identical successive latent steps: cosine 1.
  params = {"kernel": jnp.ones((3, 3))}
  opt = blaq_jax.laq(0.01, b1=0.0, diagnostics=True)
  st = opt.init(params)
  for _ in range(3):
    _, st = opt.update({"kernel": jnp.full((3, 3), 0.5)}, st, params)
  assert float(optax.tree.get(st, "update_cosine")) == pytest.approx(1.0)


def test_keep_trial_stores_trial_latent_and_gradient():
  _, state = run(blaq_jax.blaq(0.05, keep_trial=True, blend="moments"), steps=1)
  tl = optax.tree.get(state, "trial_latent")["l1"]["kernel"]
  tg = optax.tree.get(state, "trial_grad")["l1"]["kernel"]
  chex.assert_shape([tl, tg], (8, 16))
  assert float(jnp.abs(tg).sum()) > 0


def test_blended_moments_option_changes_what_is_carried():
  _, s_real = run(blaq_jax.blaq(0.05, blend="moments"), steps=3)
  _, s_blend = run(blaq_jax.blaq(0.05, moments="blended", blend="moments"), steps=3)
  assert not np.allclose(optax.tree.get(s_real, "mu")["l1"]["kernel"],
                         optax.tree.get(s_blend, "mu")["l1"]["kernel"])


def test_transparent_mode_equals_opaque_on_a_fixed_batch():
  """With the same batch each call, two transparent calls = one opaque."""
  params, loss = mlp_problem()
  opaque = blaq_jax.blaq(0.02, active=2, blend="moments")
  transparent = blaq_jax.blaq(0.02, active=2, opaque=False, blend="moments")
  p1, s1 = params, opaque.init(params)
  p2, s2 = params, transparent.init(params)
  t_step = jax.jit(lambda p, s: transparent.update(jax.grad(loss)(p), s, p))
  for _ in range(4):  # steps 0 and 2 active: 6 transparent calls
    u, s1 = opaque.update(jax.grad(loss)(p1), s1, p1, grad_fn=jax.grad(loss))
    p1 = optax.apply_updates(p1, u)
    u, s2 = t_step(p2, s2)
    p2 = optax.apply_updates(p2, u)
    if bool(optax.tree.get(s2, "pending")):
      u, s2 = t_step(p2, s2)
      p2 = optax.apply_updates(p2, u)
    assert not bool(optax.tree.get(s2, "pending"))
    chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)
  assert int(s2.count) == 4


def test_channel_axis_gives_one_scale_per_output():
  _, state = run(blaq_jax.laq(0.01, channel_axis=-1))
  chex.assert_shape(blaq_jax.scales(state)["l1"]["kernel"], (16,))
  chex.assert_shape(blaq_jax.scales(state)["l2"]["kernel"], (3,))


def test_per_leaf_bits_and_default_selection():
  params, _ = mlp_problem()
  rule = lambda path, leaf: (8 if blaq_jax.path_str(path) == "l1/kernel"
                             else blaq_jax.default_quantize(path, leaf))
  state = blaq_jax.laq(0.01, quantize=rule).init(params)
  qt = blaq_jax.quantized_tensors(state)
  assert qt["l1"]["kernel"].bits == 8 and qt["l2"]["kernel"].bits == 1
  assert isinstance(qt["l1"]["bias"], optax.MaskedNode)
  assert isinstance(blaq_jax.latent_params(state)["l2"]["bias"],
                    optax.MaskedNode)


def test_full_precision_leaves_follow_adam():
  params, loss = mlp_problem()
  opt, adam = blaq_jax.laq(0.01), optax.adam(0.01)
  u, _ = opt.update(jax.grad(loss)(params), opt.init(params), params)
  ua, _ = adam.update(jax.grad(loss)(params), adam.init(params), params)
  np.testing.assert_allclose(u["l1"]["bias"], ua["l1"]["bias"], rtol=1e-5)


def test_curvature_accessor():
  params, _ = mlp_problem()
  _, state = run(blaq_jax.laq(0.01), steps=2)
  d = blaq_jax.curvature(state, 0.01)
  v_hat = optax.tree.get(state, "sqrt_nu")["l1"]["kernel"] ** 2 / (1 - B2 ** 2)
  # float32 bias correction 1 - b2^2 carries ~3e-5 relative error.
  np.testing.assert_allclose(d["l1"]["kernel"],
                             (EPS + np.sqrt(v_hat)) / 0.01, rtol=1e-4)
  del params


# --- a small real data set ---------------------------------------------------

def load_digits_subset(data_dir, n_train=2000, n_test=1000):
  import gzip  # pylint: disable=g-import-not-at-top
  def read(name, offset):
    with gzip.open(data_dir / "mnist" / name, "rb") as f:
      return np.frombuffer(f.read(), np.uint8, offset=offset)
  x = read("train-images-idx3-ubyte.gz", 16).reshape(-1, 784)
  y = read("train-labels-idx1-ubyte.gz", 8)
  xt = read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 784)
  yt = read("t10k-labels-idx1-ubyte.gz", 8)
  f = lambda a: a.astype(np.float32) / 255.0
  return (f(x[:n_train]), y[:n_train].astype(np.int32),
          f(xt[:n_test]), yt[:n_test].astype(np.int32))


@pytest.mark.parametrize("method", ["laq", "blaq"])
def test_binary_mlp_trains_on_mnist_subset(method, shared_data_dir):
  x, y, xt, yt = load_digits_subset(shared_data_dir)
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"l1": {"kernel": jax.random.normal(k1, (784, 128)) * 0.05,
                   "bias": jnp.zeros(128)},
            "l2": {"kernel": jax.random.normal(k2, (128, 10)) * 0.1,
                   "bias": jnp.zeros(10)}}

  def logits_fn(p, xb):
    h = xb @ p["l1"]["kernel"] + p["l1"]["bias"]
    h = (h - h.mean(0)) / (h.std(0) + 1e-5)  # batch norm without affine
    return jax.nn.relu(h) @ p["l2"]["kernel"] + p["l2"]["bias"]

  def loss(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(p, xb), yb).mean()

  opt = blaq_jax.laq(0.005) if method == "laq" else blaq_jax.blaq(0.005, blend="moments")
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)

  @jax.jit
  def step(p, s, xb, yb):
    g = jax.grad(loss)(p, xb, yb)
    u, s = opt.update(g, s, p, grad_fn=lambda q: jax.grad(loss)(q, xb, yb))
    return optax.apply_updates(p, u), s

  rng = np.random.default_rng(0)
  for _ in range(3):
    for idx in rng.permutation(len(x)).reshape(-1, 100):
      params, state = step(params, state, x[idx], y[idx])
  acc = float(np.mean(np.argmax(logits_fn(params, xt), -1) == yt))
  mags = np.abs(np.asarray(params["l1"]["kernel"]))
  np.testing.assert_allclose(mags, mags.max(), rtol=1e-6)  # one scale
  assert acc > 0.75, acc  # chance is 0.1


# --- bad input ----------------------------------------------------------------

def test_bad_input_errors():
  params, loss = mlp_problem()
  g = jax.grad(loss)(params)
  with pytest.raises(ValueError, match="Unsupported bit width bits=9"):
    blaq_jax.laq(0.1, bits=9)
  with pytest.raises(ValueError, match="a must be a scalar in"):
    blaq_jax.blaq(0.1, a=1.5, blend="moments")
  with pytest.raises(ValueError, match="active must be"):
    blaq_jax.blaq(0.1, active=0, blend="moments")
  with pytest.raises(TypeError, match="'l1/kernel' has dtype int32"):
    blaq_jax.laq(0.1).init({"l1": {"kernel": jnp.ones((2, 2), jnp.int32)}})
  with pytest.raises(TypeError, match="'w' has dtype complex64"):
    blaq_jax.laq(0.1).init({"w": jnp.ones((2, 2), jnp.complex64)})
  with pytest.raises(ValueError, match="does not match the params"):
    blaq_jax.laq(0.1, quantize={"l1": {"kernel": True}}).init(params)
  with pytest.raises(ValueError, match="bits of leaf 'l1/bias'"):
    blaq_jax.laq(0.1, quantize=lambda p, x: 12).init(params)
  opt = blaq_jax.blaq(0.1, blend="moments")
  state = opt.init(params)
  with pytest.raises(ValueError, match="needs the keyword argument grad_fn"):
    opt.update(g, state, params)
  bad = lambda p: {"l1": p["l1"]}
  with pytest.raises(ValueError, match=r"output of grad_fn.*'l2/kernel'"):
    opt.update(g, state, params, grad_fn=bad)
  with pytest.raises(ValueError, match="needs params"):
    opt.update(g, state, grad_fn=jax.grad(loss))
  with pytest.raises(ValueError, match="another config"):
    blaq_jax.laq(0.1, bits=2).update(g, blaq_jax.laq(0.1).init(params),
                                     params)


@pytest.mark.parametrize("make, match", [
    (lambda: blaq_jax.laq(0.1, level_set="uniform"),
     r"Unknown level_set 'uniform'; expected one of"),
    (lambda: blaq_jax.blaq(0.1, blend="average"),
     r"blend must be one of \('moments', 'lookahead', 'gradients'\), got "
     "'average'"),
    (lambda: blaq_jax.blaq(0.1, moments="mean"),
     "moments must be 'real' or 'blended', got 'mean'"),
], ids=["level_set", "blend", "moments"])
def test_unknown_choice_is_named(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_curvature_fn_in_the_transparent_mode_is_refused():
  params, loss = mlp_problem()
  opt = blaq_jax.blaq(0.1, opaque=False)
  state = opt.init(params)
  curvature = lambda p: jax.tree.map(jnp.ones_like, p)  # noqa: E731
  with pytest.raises(ValueError, match="curvature_fn is supported in opaque "
                     "mode only"):
    opt.update(jax.grad(loss)(params), state, params, curvature_fn=curvature)
