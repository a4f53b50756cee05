"""Tests of the dense layers that compute from packed weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blaq_jax.levels import LevelSet
from blaq_jax.packed_dense import (pack_signs, unpack_dense, xnor_dense,
                                   xnor_weights)
from blaq_jax.packing import pack_bits
from blaq_jax.state import QuantizedTensor


@pytest.mark.parametrize("kind,bits,channel_axis", [
    ("blaq", 1, None), ("blaq", 2, -1), ("linear", 3, -1), ("log", 4, None)])
def test_unpack_dense_matches_dequantized_matmul(kind, bits, channel_axis):
  rng = np.random.default_rng(bits)
  ls = LevelSet(kind, bits)
  n_in, n_out = 37, 11  # 37 * 11 * bits does not fill the last byte
  codes = rng.integers(0, ls.num_levels, (n_in, n_out)).astype(np.uint8)
  alpha = (rng.uniform(0.1, 1.0, n_out) if channel_axis == -1
           else rng.uniform(0.1, 1.0, ())).astype(np.float32)
  x = rng.standard_normal((5, n_in)).astype(np.float32)
  bias = rng.standard_normal(n_out).astype(np.float32)
  w = QuantizedTensor(jnp.asarray(codes), jnp.asarray(alpha), ls,
                      channel_axis).dequantize()
  fn = jax.jit(functools.partial(unpack_dense, level_set=ls,
                                 shape=(n_in, n_out),
                                 channel_axis=channel_axis))
  got = fn(x, pack_bits(codes, bits), alpha, bias=bias)
  expected = jax.jit(lambda x, w, b: x @ w + b)(x, w, bias)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_in", [1, 31, 32, 70])
def test_xnor_dense_equals_sign_matmul(n_in):
  rng = np.random.default_rng(n_in)
  n_out = 9
  codes = rng.integers(0, 2, (n_in, n_out)).astype(np.uint8)
  alpha = rng.uniform(0.1, 1.0, n_out).astype(np.float32)
  x = rng.standard_normal((4, n_in)).astype(np.float32)
  x[0, 0] = 0.0  # sign(0) = +1, as in LevelSet("blaq", 1)
  ww = xnor_weights(pack_bits(codes, 1), (n_in, n_out))
  assert ww.shape == (n_out, -(-n_in // 32)) and ww.dtype == jnp.uint32
  got = jax.jit(xnor_dense, static_argnums=2)(pack_signs(x), ww, n_in, alpha)
  signs = np.where(x >= 0, 1, -1).astype(np.int64)
  dot = signs @ np.where(codes == 1, 1, -1).astype(np.int64)
  np.testing.assert_array_equal(np.asarray(got),
                                (alpha * dot.astype(np.float32)))
