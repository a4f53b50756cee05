"""The fixed-round projection (``tol=None``) against numpy, and its guarantees.

The numpy references are written from METHOD.md's Algorithm 2 with an argmin
over the levels, independent of the library's closed-form ``nearest``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax
from blaq_jax.levels import LevelSet, gaussian_scale
from blaq_jax.projection import (encode, extrapolate, fused_sums,
                                 initial_scale, project)

SETS = [("blaq", 2), ("blaq", 3), ("linear", 2), ("linear", 3), ("log", 3)]


def np_nearest(x, values):
  return values[np.argmin(np.abs(x[..., None] - values), axis=-1)]


def np_rounds(w, d, values, alpha, rounds):
  """``rounds`` rounds from the scale ``alpha`` (plain alternation, an
  Aitken start every third round, then the best round kept), then the
  codes."""
  best, best_gain, hist, extrapolated = alpha, None, [alpha], False
  for r in range(rounds):
    beta = np_nearest(w / alpha, values)
    s1, s2 = np.sum(d * beta * w), np.sum(d * beta * beta)
    new = s1 / s2
    if not extrapolated or s1 * new >= best_gain:
      best, best_gain = new, s1 * new
    hist.append(new)
    alpha = new
    if len(hist) == 3 and r < rounds - 1:
      extrapolated = True
      x0, x1, x2 = hist
      den = x2 - 2 * x1 + x0
      guess = x0 - (x1 - x0) ** 2 / den if den != 0 else x2
      alpha = guess if x2 / 2 < guess < 2 * x2 else x2
      hist = [alpha]
  return best, np_nearest(w / best, values)


def np_plain_rounds(w, d, values, alpha, rounds):
  for _ in range(rounds):
    beta = np_nearest(w / alpha, values)
    alpha = np.sum(d * beta * w) / np.sum(d * beta * beta)
  return alpha


def np_converged(w, d, values, beta, tol=1e-6):
  """The pre-change ``project`` with ``tol > 0``, in numpy (start ``beta``)."""
  alpha_old = np.inf
  for _ in range(200):
    alpha = np.sum(d * beta * w) / np.sum(d * beta * beta)
    beta = np_nearest(w / alpha, values)
    if abs(alpha - alpha_old) < tol:
      break
    alpha_old = alpha
  return alpha, beta


def error(w, d, q):
  return float(np.sum(np.asarray(d, np.float64) * (w - q) ** 2))


def problem(seed, shape=(64, 5)):
  rng = np.random.default_rng(seed)
  w = rng.normal(scale=0.1, size=shape).astype(np.float32)
  d = rng.uniform(0.2, 3.0, size=shape).astype(np.float32)
  return w, d


@pytest.mark.parametrize("rounds", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("kind,bits", SETS)
def test_fixed_rounds_match_numpy_from_the_previous_scale(kind, bits, rounds):
  w, d = problem(0)
  ls = LevelSet(kind, bits)
  prev = np.float32(0.05)  # a poor start, so that every round moves alpha
  alpha, codes = project(w, d, ls, prev_alpha=prev, tol=None,
                         max_iter=rounds)
  ref_alpha, ref_beta = np_rounds(w.astype(np.float64), d, ls.values
                                  .astype(np.float64), float(prev), rounds)
  chex.assert_shape(alpha, ())
  chex.assert_type(codes, jnp.uint8)
  np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-5)
  np.testing.assert_array_equal(ls.values[np.asarray(codes)], ref_beta)


def test_start_alpha_overrides_prev_alpha_and_prev_codes_are_not_read():
  w, d = problem(1)
  ls = LevelSet("blaq", 2)
  alpha, _ = project(w, d, ls, prev_alpha=np.float32(0.05),
                     start_alpha=np.float32(0.3), tol=None, max_iter=1)
  ref, _ = np_rounds(w.astype(np.float64), d, ls.values, 0.3, 1)
  np.testing.assert_allclose(alpha, ref, rtol=1e-5)
  codes = ls.codes(jnp.asarray(w))  # any codes: ignored with tol=None
  again, _ = project(w, d, ls, prev_codes=codes, prev_alpha=np.float32(0.05),
                     start_alpha=np.float32(0.3), tol=None, max_iter=1)
  assert float(again) == float(alpha)


def test_fixed_rounds_without_a_previous_scale_start_from_the_guess():
  w, d = problem(2)
  ls = LevelSet("linear", 3)
  rms = np.sqrt(np.sum(d * w.astype(np.float64) ** 2) / np.sum(d))
  guess = gaussian_scale(ls) * rms
  np.testing.assert_allclose(initial_scale(w, d, ls), guess, rtol=1e-5)
  alpha, codes = project(w, d, ls, tol=None, max_iter=2)
  ref_alpha, ref_beta = np_rounds(w.astype(np.float64), d, ls.values, guess,
                                  2)
  np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-5)
  np.testing.assert_array_equal(ls.values[np.asarray(codes)], ref_beta)


def test_per_channel_fixed_rounds_equal_per_slice():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
  d = rng.uniform(0.5, 2.0, size=w.shape).astype(np.float32)
  ls = LevelSet("blaq", 2)
  prev = np.linspace(0.5, 1.5, 6).astype(np.float32)
  alpha, codes = project(w, d, ls, channel_axis=-1, prev_alpha=prev,
                         tol=None, max_iter=2)
  chex.assert_shape(alpha, (6,))
  for c in range(6):
    ref_alpha, ref_beta = np_rounds(w[..., c].astype(np.float64), d[..., c],
                                    ls.values, float(prev[c]), 2)
    np.testing.assert_allclose(alpha[c], ref_alpha, rtol=1e-5)
    np.testing.assert_array_equal(ls.values[np.asarray(codes[..., c])],
                                  ref_beta)


@pytest.mark.parametrize("kind,bits", SETS)
def test_rounds_do_no_worse_than_the_plain_alternation(kind, bits):
  """The kept round's error (the bound the codes then improve on) never
  exceeds that of the first two plain rounds, and more rounds keep it."""
  w, d = problem(4, shape=(400,))
  ls = LevelSet(kind, bits)
  values = ls.values.astype(np.float64)

  def bound(alpha):  # error of (alpha', nearest(w / alpha)), alpha' optimal
    beta = np_nearest(w / alpha, values)
    return error(w, d, np.sum(d * beta * w) / np.sum(d * beta * beta) * beta)

  def kept(rounds):  # the round project keeps: its scale is F(start)
    alpha, _ = project(w, d, ls, prev_alpha=np.float32(0.02), tol=None,
                       max_iter=rounds)
    return error(w, d, float(alpha) * np_nearest(w / float(alpha), values))

  plain2 = bound(np_plain_rounds(w, d, values, 0.02, 1))
  errors = [kept(r) for r in range(2, 8)]
  assert all(e <= plain2 * (1 + 1e-6) for e in errors)
  assert errors[-1] <= errors[0] * (1 + 1e-6)


@pytest.mark.parametrize("kind,bits", SETS)
def test_tol_converges_to_the_same_minimiser_as_before(kind, bits):
  """``tol > 0`` is the old loop: same start (prev codes), same fixed point."""
  w, d = problem(5, shape=(300, 7))
  ls = LevelSet(kind, bits)
  start = ls.codes(jnp.asarray(w / np.abs(w).max()))
  alpha, codes = project(w, d, ls, prev_codes=start, tol=1e-6, max_iter=200)
  ref_alpha, ref_beta = np_converged(w.astype(np.float64), d, ls.values,
                                     ls.values[np.asarray(start)])
  np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-5)
  np.testing.assert_array_equal(ls.values[np.asarray(codes)], ref_beta)
  # Enough fixed rounds from that scale stay at the fixed point.
  again, codes2 = project(w, d, ls, prev_alpha=alpha, tol=None, max_iter=3)
  np.testing.assert_allclose(again, alpha, rtol=1e-6)
  np.testing.assert_array_equal(codes2, codes)


@pytest.mark.parametrize("kind,bits", SETS)
def test_tol_from_codes_of_the_opposite_signs_keeps_alpha_positive(kind, bits):
  """Started from the codes of -w (every sign flipped, so the start scale
  is negative), the loop still returns a positive scale and the codes of
  the start from w's own codes: the rounds reduce |beta| |w|."""
  w, d = problem(6, shape=(300, 7))
  ls = LevelSet(kind, bits)
  own = ls.codes(jnp.asarray(w / np.abs(w).max()))
  flipped = ls.codes(jnp.asarray(-w / np.abs(w).max()))
  alpha, codes = project(w, d, ls, prev_codes=flipped, tol=1e-7,
                         max_iter=200)
  ref_alpha, ref_codes = project(w, d, ls, prev_codes=own, tol=1e-7,
                                 max_iter=200)
  assert float(alpha) > 0
  np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-5)
  np.testing.assert_array_equal(codes, ref_codes)


def test_fixed_rounds_have_no_while_loop_and_tol_has_one():
  ls = LevelSet("blaq", 2)
  w = jnp.ones((8, 4))

  def jaxpr(tol):
    return str(jax.make_jaxpr(lambda w, d, a: project(
        w, d, ls, prev_alpha=a, tol=tol, max_iter=3))(w, w, jnp.ones(())))

  assert "while" not in jaxpr(None)
  assert "while" in jaxpr(1e-6)


@pytest.mark.parametrize("make,loop", [
    (lambda: blaq_jax.laq(0.01, bits=2, tol=None, max_iter=2), False),
    (lambda: blaq_jax.ste(0.01, quantizer="uniform", bits=2), False),
    (lambda: blaq_jax.ste(0.01, quantizer="ternary"), False),
    (lambda: blaq_jax.ste(0.01, quantizer="uniform", bits=3), True),
], ids=["laq2-R2", "ste2-default", "ternary-default", "ste3-default"])
def test_fixed_rounds_have_no_while_loop_and_stay_on_the_set(make, loop):
  """2 bits: 2 fixed rounds by default (the STE's fitted scale as LAQ's);
  above 2 bits the default converges in a loop."""
  params = {"kernel": jax.random.normal(jax.random.key(0), (16, 8)) * 0.1}
  opt = make()
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)
  loss = lambda p: jnp.sum((p["kernel"] - 0.05) ** 2)  # noqa: E731
  text = str(jax.make_jaxpr(opt.update)(jax.grad(loss)(params), state,
                                        params))
  assert ("while" in text) == loop
  for _ in range(5):
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  blaq_jax.check_on_level_set(params, state)


@pytest.mark.parametrize("make,stored", [
    (lambda: blaq_jax.laq(0.01), False),
    (lambda: blaq_jax.laq(0.01, bits=2), False),  # 2 fixed rounds
    (lambda: blaq_jax.laq(0.01, bits=3), True),  # converges from the codes
    (lambda: blaq_jax.laq(0.01, diagnostics=True), True),  # flip count
    (lambda: blaq_jax.ste(0.01, quantizer="uniform", bits=2), False),
    (lambda: blaq_jax.ste(0.01, quantizer="uniform", bits=2, tol=1e-6),
     True),  # converges from the codes
], ids=["laq1", "laq2", "laq3", "laq1-diag", "ste2", "ste2-tol"])
def test_codes_are_stored_only_where_a_step_reads_the_last_ones(make, stored):
  params = {"kernel": jax.random.normal(jax.random.key(1), (16, 8)) * 0.1}
  opt = make()
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)
  loss = lambda p: jnp.sum((p["kernel"] - 0.05) ** 2)  # noqa: E731
  step = jax.jit(opt.update)
  for _ in range(3):
    updates, state = step(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  kept = [x for x in jax.tree.leaves(state) if x.dtype == jnp.uint8]
  assert bool(kept) == stored
  # Stored or derived, they are the codes of the stored latent weights.
  scale = jax.tree.leaves(state.quantized, is_leaf=lambda x: isinstance(
      x, blaq_jax.LeafScale))[0]
  np.testing.assert_array_equal(
      blaq_jax.codes(state)["kernel"],
      encode(state.latent["kernel"], scale.alpha, scale.level_set))
  blaq_jax.check_on_level_set(params, state)


@pytest.mark.parametrize("trial_rounds,rounds", [(1, 1), (None, 2), (3, 3)])
def test_blaq_trial_point_is_projected_in_trial_rounds(trial_rounds, rounds):
  """On 0.5 sum h (q - c)^2 the stored g* = h (q* - c) gives q*: it is the
  numpy projection of the stored w* with D_t in that many rounds from the
  last scale (None: the real step's 2)."""
  rng = np.random.default_rng(1)
  w0 = rng.normal(scale=0.3, size=(16, 8)).astype(np.float32)
  h = rng.uniform(0.5, 4.0, size=w0.shape).astype(np.float32)
  c = rng.normal(scale=0.3, size=w0.shape).astype(np.float32)
  loss = lambda p: 0.5 * jnp.sum(h * (p["kernel"] - c) ** 2)  # noqa: E731
  opt = blaq_jax.blaq(0.01, bits=2, level_set="linear", keep_trial=True,
                      trial_rounds=trial_rounds)
  params = {"kernel": jnp.asarray(w0)}
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)
  alpha0 = np.float64(blaq_jax.scales(state)["kernel"])
  _, state = opt.update(jax.grad(loss)(params), state, params,
                        grad_fn=jax.grad(loss))
  w_star, g_star, root = (np.asarray(optax.tree.get(state, k)["kernel"],
                                     np.float64)
                          for k in ("trial_latent", "trial_grad", "sqrt_nu"))
  d = 1e-8 + root / np.sqrt(1 - 0.999)  # D_t up to the factor 1 / eta
  values = LevelSet("linear", 2).values.astype(np.float64)
  want, other = ((lambda a, b: a * b)(*np_rounds(w_star, d, values, alpha0,
                                                  r))
                  for r in (rounds, 2 if rounds == 1 else 1))
  assert not np.allclose(want, other)  # the round count shows in q*
  np.testing.assert_allclose(g_star / h + c, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, True, 1.5, jnp.array(1)])
def test_trial_rounds_must_be_a_static_positive_int(bad):
  with pytest.raises(ValueError, match="trial_rounds"):
    blaq_jax.blaq(0.01, trial_rounds=bad)


def test_one_round_forms_both_sums_in_one_pass():
  """A per-tensor round reads w and d once: 8 bytes per entry, plus its two
  partial sums (1/16 of the tensor each) written and read back: 9 in all
  (reading w or d twice would be 12)."""
  ls = LevelSet("blaq", 2)
  w = jnp.ones((1024, 1024))
  compiled = jax.jit(lambda w, d, a: project(
      w, d, ls, prev_alpha=a, tol=None, max_iter=1)[0]).lower(
          w, w, jnp.ones(())).compile()
  per_entry = compiled.cost_analysis()["bytes accessed"] / w.size
  assert per_entry < 9.5, per_entry


def test_blaq_1bit_trial_point_is_formed_in_its_passes_not_written():
  """An active 1-bit BLAQ step (update + apply, params and state donated, a
  stand-in trial gradient that reads the trial params) forms ``w*`` inside
  the trial's sums and the trial-params pass: 120 bytes per parameter.
  Writing ``w*`` in a pass of its own and reading it back in both is 128."""
  params = {"kernel": jnp.ones((1024, 1024))}
  opt = blaq_jax.blaq(0.01, bits=1)

  def step(p, state, g, g2):
    u, state = opt.update(g, state, p, grad_fn=lambda q: jax.tree.map(
        lambda a, b: a + 0.0 * b, g2, q))
    return optax.apply_updates(p, u), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, opt.init(params), params, params).compile()
  per_param = compiled.cost_analysis()["bytes accessed"] / 2 ** 20
  assert per_param < 124, per_param


@pytest.mark.parametrize("block", [16, 8])
@pytest.mark.parametrize("shape", [(64, 32), (3, 3, 32, 48), (5, 7), (48,),
                                   (16, 16), (8, 8)])
def test_fused_sums_equal_the_sums_for_every_shape(shape, block):
  # Split along axis 0, along axis 2 (a conv kernel), no axis the block
  # divides, a vector, and axes of exactly the block (not split).
  x = np.random.default_rng(8).normal(size=shape).astype(np.float32)
  got = fused_sums([jnp.asarray(x), jnp.asarray(x) ** 2, jnp.ones(shape)],
                   tuple(range(len(shape))), block)
  ref = [np.sum(x, dtype=np.float64), np.sum(x.astype(np.float64) ** 2),
         np.prod(shape)]
  np.testing.assert_allclose([float(g) for g in got], ref, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("kind,bits,tol", [("blaq", 1, 1e-6), ("blaq", 2, None),
                                           ("blaq", 2, 1e-6), ("linear", 3, None)])
def test_the_sum_block_changes_only_the_rounding(kind, bits, tol):
  """BLAQ's projections sum in blocks of 8, the others' of 16: the same
  scale to float32 rounding and the same codes, at 1 bit (closed form), in
  fixed rounds and converged."""
  rng = np.random.default_rng(9)
  w = jnp.asarray(rng.normal(size=(256, 96)), jnp.float32)
  d = jnp.asarray(rng.uniform(0.1, 2.0, size=(256, 96)), jnp.float32)
  ls = LevelSet(kind, bits)
  a16, c16 = project(w, d, ls, tol=tol, max_iter=3)
  a8, c8 = project(w, d, ls, tol=tol, max_iter=3, sum_block=8)
  np.testing.assert_allclose(a8, a16, rtol=2e-6)
  np.testing.assert_array_equal(c8, c16)


@pytest.mark.parametrize("formed", ["d", "w", "w,d"])
@pytest.mark.parametrize("bits,tol", [(1, 1e-6), (2, None), (2, 1e-6),
                                      (3, None)])
def test_a_weight_formed_in_each_pass_projects_like_its_array(bits, tol,
                                                              formed):
  """``d`` or ``w`` as a callable (formed anew in each pass: BLAQ's
  ``D_bar``, its trial point ``w*``) gives the arrays' scale and codes.
  ``d`` is called once per pass (1 at 1 bit, the fixed rounds' count with
  ``tol=None``); ``w`` also for the codes at the end, and in fixed rounds
  once for its shape (a call XLA drops)."""
  rng = np.random.default_rng(10)
  w = jnp.asarray(rng.normal(size=(64, 48)), jnp.float32)
  d = jnp.asarray(rng.uniform(0.1, 2.0, size=(64, 48)), jnp.float32)
  calls = {"w": [], "d": []}
  args = {k: (lambda k=k, x=x: calls[k].append(1) or x) if k in formed
          else x for k, x in (("w", w), ("d", d))}
  ls = LevelSet("blaq", bits)
  a0, c0 = project(w, d, ls, tol=tol, max_iter=3, eps=0.25,
                   prev_alpha=jnp.array(0.8))
  a1, c1 = project(args["w"], args["d"], ls, tol=tol, max_iter=3, eps=0.25,
                   prev_alpha=jnp.array(0.8))
  np.testing.assert_allclose(a1, a0, rtol=1e-6)
  np.testing.assert_array_equal(c1, c0)
  if tol is None or bits == 1:
    passes = 1 if bits == 1 else 3
    assert len(calls["d"]) == (passes if "d" in formed else 0)
    assert len(calls["w"]) == (
        (2 if bits == 1 else passes + 2) if "w" in formed else 0)


@pytest.mark.parametrize("method,kwargs,blocks", [
    ("laq", {}, {16}), ("blaq", {}, {8}), ("blaq", {"active": 2}, {16, 8})])
def test_blaq_projects_its_active_step_in_blocks_of_8(method, kwargs, blocks):
  """BLAQ's projections on an active step form their weight (``D_t`` of the
  trial point, ``D_bar``) from several arrays inside the sums, and in blocks
  of 16 such reductions ran 4.5-5.7x slower on an AMD host (``sum_block`` of
  :func:`~blaq_jax.projection.project`): they sum in blocks of 8. LAQ's
  weight and the real projection of a step under ``cond`` (``active=2``,
  whose ``D_bar`` is written out) keep 16. Read from the lowered 2-bit
  update: a (64, 32) leaf is split into (64 / block, block, 32)."""
  params = {"kernel": jnp.ones((64, 32))}
  opt = getattr(blaq_jax, method)(0.01, bits=2, **kwargs)
  extra = {"grad_fn": lambda p: p} if method == "blaq" else {}
  text = jax.jit(lambda g, s: opt.update(g, s, params, **extra)).lower(
      params, opt.init(params)).as_text()
  found = {b for b in (16, 8) if f"tensor<{64 // b}x{b}x32xf32>" in text}
  assert found == blocks


def test_fused_sums_are_accurate_on_millions_of_entries():
  rng = np.random.default_rng(6)
  x = rng.normal(1.0, 1.0, size=(2048, 2048)).astype(np.float32)
  got = fused_sums([jnp.asarray(x), jnp.asarray(x) ** 2], (0, 1))
  ref = [np.sum(x, dtype=np.float64), np.sum(x.astype(np.float64) ** 2)]
  np.testing.assert_allclose([float(g) for g in got], ref, rtol=1e-5)


@pytest.mark.parametrize("kind,bits", SETS)
def test_gaussian_scale_minimises_the_error_of_a_normal_sample(kind, bits):
  ls = LevelSet(kind, bits)
  x = np.random.default_rng(7).normal(size=200_000)
  values = ls.values.astype(np.float64)

  def err(c):
    return np.mean((x - c * np_nearest(x / c, values)) ** 2)

  c = gaussian_scale(ls)
  assert err(c) <= min(err(0.95 * c), err(1.05 * c))


def test_extrapolate_stays_within_a_factor_two():
  np.testing.assert_allclose(extrapolate(jnp.array([0.5, 1.0, 1.0]),
                                         jnp.array([0.4, 3.0, 0.1])),
                             [0.6, 0.5, 1.9], rtol=1e-6)


def test_fixed_rounds_need_a_static_positive_round_count():
  with pytest.raises(ValueError, match="number of rounds"):
    project(jnp.ones(4), jnp.ones(4), LevelSet("blaq", 2), tol=None,
            max_iter=0)


def test_fixed_rounds_refuse_a_traced_round_count():
  with pytest.raises(ValueError, match="static int"):
    project(jnp.ones(4), jnp.ones(4), LevelSet("blaq", 2), tol=None,
            max_iter=jnp.array(2))


def test_negative_tol_is_refused():
  with pytest.raises(ValueError, match="tol must be None"):
    project(jnp.ones(4), jnp.ones(4), LevelSet("blaq", 2), tol=-1.0)


@pytest.mark.parametrize("kind,bits", SETS + [("blaq", 1), ("linear", 4)])
@pytest.mark.parametrize("tol", [None, 1e-6])
def test_encode_gives_the_projections_codes_bit_for_bit(kind, bits, tol):
  # The state stores no codes: encode(w, alpha) must be what project returns.
  w, d = problem(8, shape=(50, 6))
  ls = LevelSet(kind, bits)
  alpha, codes = project(w, d, ls, channel_axis=-1, tol=tol, max_iter=2)
  np.testing.assert_array_equal(encode(w, alpha, ls, channel_axis=-1), codes)


def test_encode_at_one_bit_is_the_sign_even_where_w_over_alpha_underflows():
  w = jnp.array([-1e-30, 1e-30, 0.0, -3.0], jnp.float32)  # w / alpha: +-0
  got = encode(w, jnp.array(1e30), LevelSet("blaq", 1))
  assert got.tolist() == [0, 1, 1, 0]

@pytest.mark.parametrize("kind,bits", SETS + [("blaq", 1), ("linear", 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_update_levels_are_the_decoded_codes_bit_for_bit(kind, bits,
                                                             dtype):
  # The emitted update forms alpha * beta without the integer codes; it
  # must be exactly the dequantized codes (also with TWN's unit).
  w, d = problem(9, shape=(50, 6))
  w[0, :3] = [0.0, -0.0, -1e-30]
  ls = LevelSet(kind, bits)
  alpha, _ = project(w, d, ls, channel_axis=-1, tol=1e-6)
  for unit in (None, 0.7 * alpha):
    scale = blaq_jax.LeafScale(alpha, unit, level_set=ls, channel_axis=-1)
    got = scale.dequantize(w, dtype)
    chex.assert_type(got, dtype)
    np.testing.assert_array_equal(got, scale.at(w).dequantize(dtype))
