"""Level sets and the D-weighted projection against brute-force answers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blaq_jax
from blaq_jax.levels import LevelSet
from blaq_jax.projection import dequantize, project

ALL_SETS = [("blaq", b) for b in range(1, 9)] + [
    (k, b) for k in ("linear", "log") for b in range(2, 9)]


def brute_nearest(x, values):
  return values[np.argmin(np.abs(x[:, None] - values[None, :]), axis=1)]


@pytest.mark.parametrize("kind,bits", ALL_SETS)
def test_nearest_matches_argmin_and_codes_round_trip(kind, bits):
  ls = LevelSet(kind, bits)
  v = ls.values
  assert len(v) <= 2 ** bits and np.all(np.diff(v) > 0)
  assert v.min() == -1.0 and v.max() == 1.0
  x = np.linspace(-1.5, 1.5, 4001).astype(np.float32)
  got = np.asarray(ls.nearest(jnp.asarray(x)))
  ref = brute_nearest(x, v)
  # Ties may resolve either way; the distance must be minimal.
  np.testing.assert_array_less(np.abs(x - got), np.abs(x - ref) + 1e-6)
  assert set(np.unique(got)) <= set(v.tolist())
  codes = ls.codes(jnp.asarray(x))
  chex.assert_type(codes, jnp.uint8)
  np.testing.assert_array_equal(np.asarray(ls.decode(codes)), got)
  np.testing.assert_array_equal(v[np.asarray(codes)], got)


@pytest.mark.parametrize("kind,bits", ALL_SETS)
def test_magnitude_is_abs_nearest_at_ties_too(kind, bits):
  ls = LevelSet(kind, bits)
  v = ls.values
  mid = (v[1:] + v[:-1]) / 2  # the ties, and the floats either side
  x = np.concatenate([v, mid, np.nextafter(mid, np.float32(2)),
                      np.nextafter(mid, np.float32(-2)),
                      np.linspace(-3, 3, 2001), [0.0, np.inf, -np.inf]])
  x = jnp.asarray(x, jnp.float32)
  got = ls.magnitude(jnp.abs(x))
  chex.assert_type(got, jnp.float32)
  np.testing.assert_array_equal(np.asarray(got),
                                np.abs(np.asarray(ls.nearest(x))))


@pytest.mark.parametrize("kind,x,want", [
    ("blaq", [0.0, 0.7499999, 0.75, 5.0], [0.5, 0.5, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 0.5000001, 5.0], [0.0, 0.0, 1.0, 1.0]),
    ("log", [0.0, 0.4999999, 0.5, 5.0], [0.0, 0.0, 1.0, 1.0])])
def test_two_bit_magnitude_thresholds(kind, x, want):
  # blaq {+-1/2, +-1}: the midpoint 3/4 rounds up (2 |x| = 1.5 halves to
  # even 2); ternary: 1/2 rounds to even 0; log {0, +-1}: 1/2 is nonzero.
  got = LevelSet(kind, 2).magnitude(jnp.asarray(x, jnp.float32))
  np.testing.assert_array_equal(np.asarray(got), want)


def test_level_sets_of_method_md():
  np.testing.assert_array_equal(LevelSet("blaq", 1).values, [-1, 1])
  np.testing.assert_array_equal(LevelSet("blaq", 2).values,
                                [-1, -0.5, 0.5, 1])
  np.testing.assert_array_equal(LevelSet("linear", 2).values, [-1, 0, 1])
  np.testing.assert_array_equal(LevelSet("log", 3).values,
                                [-1, -0.5, -0.25, 0, 0.25, 0.5, 1])
  assert float(LevelSet("blaq", 1).nearest(jnp.zeros(()))) == 1.0


@pytest.mark.parametrize("bad", [0, 9, -1])
def test_unsupported_bit_width(bad):
  with pytest.raises(ValueError, match="Unsupported bit width"):
    LevelSet("blaq", bad)


def test_a_float_bit_width_is_refused():
  with pytest.raises(TypeError, match="bits must be an int, got 1.0"):
    blaq_jax.laq(0.1, bits=1.0)


def test_linear_needs_two_bits_and_unknown_kind():
  with pytest.raises(ValueError, match="bits=1 for level set 'linear'"):
    LevelSet("linear", 1)
  with pytest.raises(ValueError, match="Unknown level set"):
    LevelSet("ternary", 2)
  with pytest.raises(TypeError, match="static_args"):
    LevelSet("blaq", jnp.array(2))


def weighted_error(w, d, q):
  return float(np.sum(d * (w - q) ** 2))


def test_binary_projection_is_exact_optimum():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(40, 3)).astype(np.float32)
  d = rng.uniform(0.1, 3.0, size=w.shape).astype(np.float32)
  ls = LevelSet("blaq", 1)
  alpha, codes = project(w, d, ls)
  np.testing.assert_allclose(alpha, np.sum(d * np.abs(w)) / np.sum(d),
                             rtol=1e-6)
  q = np.asarray(dequantize(alpha, codes, ls))
  np.testing.assert_array_equal(np.sign(q), np.where(w < 0, -1, 1))
  best = min(weighted_error(w, d, s * np.where(w < 0, -1, 1))
             for s in np.linspace(0.01, 3, 3000))
  assert weighted_error(w, d, q) <= best + 1e-5


def numpy_alternating(w, d, values, beta, tol=1e-6, iters=100):
  """Algorithm 2 in plain numpy with argmin (independent of the library)."""
  alpha_old = np.inf
  for _ in range(iters):
    alpha = np.sum(d * beta * w) / np.sum(d * beta * beta)
    beta = brute_nearest((w / alpha).ravel(), values).reshape(w.shape)
    if abs(alpha - alpha_old) < tol:
      break
    alpha_old = alpha
  return alpha, beta


@pytest.mark.parametrize("kind,bits", [("blaq", 2), ("linear", 2),
                                       ("linear", 3), ("log", 3),
                                       ("blaq", 4)])
def test_alternating_projection_matches_numpy_and_is_fixed_point(kind, bits):
  rng = np.random.default_rng(1)
  w = rng.normal(size=(64, 5)).astype(np.float32)
  d = rng.uniform(0.5, 2.0, size=w.shape).astype(np.float32)
  ls = LevelSet(kind, bits)
  start = ls.codes(jnp.asarray(w / np.abs(w).max()))
  alpha, codes = project(w, d, ls, prev_codes=start)
  beta = ls.values[np.asarray(codes)]
  ref_alpha, ref_beta = numpy_alternating(w, d, ls.values,
                                          ls.values[np.asarray(start)])
  np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-5)
  np.testing.assert_array_equal(beta, ref_beta)
  # Fixed point of both half-steps:
  np.testing.assert_allclose(
      alpha, np.sum(d * beta * w) / np.sum(d * beta * beta), rtol=1e-5)
  np.testing.assert_array_equal(
      beta, brute_nearest((w / float(alpha)).ravel(), ls.values).reshape(
          w.shape))


def test_per_channel_projection_equals_per_slice_projection():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
  d = rng.uniform(0.5, 2.0, size=w.shape).astype(np.float32)
  ls = LevelSet("linear", 3)
  alpha, codes = project(w, d, ls, channel_axis=-1)
  chex.assert_shape(alpha, (6,))
  for c in range(6):
    a_c, codes_c = project(w[..., c], d[..., c], ls,
                           prev_codes=None)
    # Same start rule per slice, so the same answer per slice.
    np.testing.assert_allclose(alpha[c], a_c, rtol=1e-5)
    np.testing.assert_array_equal(codes[..., c], codes_c)


def test_all_zero_tensor_keeps_alpha_finite():
  ls = LevelSet("linear", 2)
  w = jnp.zeros((5,))
  alpha, codes = project(w, jnp.ones_like(w), ls, prev_alpha=jnp.array(0.3))
  assert np.isfinite(float(alpha)) and float(alpha) == pytest.approx(0.3)
  np.testing.assert_array_equal(dequantize(alpha, codes, ls), 0.0)


def test_projection_jits_and_vmaps():
  ls = LevelSet("blaq", 2)
  w = jax.random.normal(jax.random.key(0), (8, 16))
  d = jnp.ones_like(w)
  a1, c1 = jax.jit(lambda w, d: project(w, d, ls))(w, d)
  a2, c2 = jax.vmap(lambda w, d: project(w, d, ls))(w, d)
  chex.assert_shape(a2, (8,))
  a_row, c_row = project(w[3], d[3], ls)
  np.testing.assert_allclose(a2[3], a_row, rtol=1e-6)
  np.testing.assert_array_equal(c2[3], c_row)
  assert np.isfinite(float(a1)) and c1.shape == w.shape
