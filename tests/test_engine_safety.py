"""The engine fails loudly: non-finite gradients, mismatched trees, chaining."""

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax

TARGET = jnp.array([[0.3, -0.2, 0.5], [0.25, -0.35, 0.1]])


def loss(p):
  return jnp.sum((p["dense"]["kernel"] - TARGET) ** 2) + jnp.sum(
      (p["dense"]["bias"] - 1.0) ** 2)


def start(opt):
  params = {"dense": {"kernel": jnp.array([[0.1, 0.1, -0.2], [-0.1, 0.1, 0.3]]),
                      "bias": jnp.zeros(3)}}
  state = opt.init(params)
  return blaq_jax.quantized_params(params, state), state


def poisoned(value):
  g = jax.grad(loss)(start(blaq_jax.laq(0.1))[0])
  return jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(value), g)


def steps(opt, params, state, n, **kw):
  for _ in range(n):
    updates, state = opt.update(jax.grad(loss)(params), state, params,
                                grad_fn=jax.grad(loss), loss_fn=loss, **kw)
    params = optax.apply_updates(params, updates)
  return params, state


OPTIMIZERS = {
    "laq": lambda: blaq_jax.laq(0.05),
    "blaq": lambda: blaq_jax.blaq(0.05),
    "blaq_lookahead": lambda: blaq_jax.blaq(0.05, blend="lookahead"),
    "ste": lambda: blaq_jax.ste(0.05),
    "bc": lambda: blaq_jax.binary_connect(0.05),
    "fogzo": lambda: blaq_jax.fogzo(0.05),
}


@pytest.mark.parametrize("value", [jnp.nan, jnp.inf])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_nonfinite_gradient_skips_the_step(name, value):
  opt = OPTIMIZERS[name]()
  params, state = steps(opt, *start(opt), 2)
  updates, new_state = jax.jit(lambda g, s, p: opt.update(
      g, s, p, grad_fn=jax.grad(loss), loss_fn=loss))(
          poisoned(value), state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  unchanged = new_state._replace(skipped_steps=state.skipped_steps,
                                 cost=state.cost)
  assert jax.tree.structure(unchanged) == jax.tree.structure(state)
  chex.assert_trees_all_equal(jax.tree.leaves(unchanged),
                              jax.tree.leaves(state))
  assert int(optax.tree.get(new_state, "skipped_steps")) == 1
  # and training goes on from there
  params, state = steps(opt, params, new_state, 3)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
  assert int(state.count) == 5


@pytest.mark.parametrize("blend", ["moments", "lookahead", "gradients"])
def test_nonfinite_trial_gradient_skips_the_step(blend):
  opt = blaq_jax.blaq(0.05, blend=blend)
  params, state = steps(opt, *start(opt), 2)
  bad_trial = lambda p: jax.tree.map(  # noqa: E731
      lambda x: x.at[(0,) * x.ndim].set(jnp.inf), jax.grad(loss)(p))
  updates, new_state = opt.update(jax.grad(loss)(params), state, params,
                                  grad_fn=bad_trial)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal(blaq_jax.latent_params(new_state),
                              blaq_jax.latent_params(state))
  chex.assert_trees_all_equal(optax.tree.get(new_state, "sqrt_nu"),
                              optax.tree.get(state, "sqrt_nu"))
  assert int(new_state.skipped_steps) == 1 and int(new_state.count) == 2


def test_apply_if_finite_around_the_transform_still_works():
  opt = optax.apply_if_finite(blaq_jax.blaq(0.05), max_consecutive_errors=3)
  params, state = start(opt)
  params, state = steps(opt, params, state, 2)
  updates, state = opt.update(poisoned(jnp.nan), state, params,
                              grad_fn=jax.grad(loss))
  assert int(state.notfinite_count) == 1
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))


def test_preprocess_reaches_the_trial_gradient():
  clip = 1e-3
  opt = blaq_jax.blaq(0.05, keep_trial=True,
                      preprocess=optax.clip_by_global_norm(clip))
  params, state = start(opt)
  big = lambda p: jax.tree.map(lambda x: 1e4 * x, jax.grad(loss)(p))  # noqa
  updates, state = opt.update(big(params), state, params, grad_fn=big)
  trial = optax.tree.get(state, "trial_grad")
  norm = optax.tree.norm(jax.tree.map(
      lambda x: jnp.zeros(()) if isinstance(x, optax.MaskedNode) else x,
      trial, is_leaf=lambda x: isinstance(x, optax.MaskedNode)))
  assert float(norm) <= clip * (1 + 1e-5)
  assert float(norm) > 0
  # the moments saw the clipped main gradient: |m| <= (1 - b1) clip
  mu = optax.tree.get(state, "mu")
  assert float(optax.tree.norm(mu)) <= 0.1 * clip * (1 + 1e-5)


def test_diagnostics_are_opt_in():
  opt = blaq_jax.blaq(0.05)
  _, state = steps(opt, *start(opt), 2)
  assert optax.tree.get(state, "flip_fraction") is None
  assert optax.tree.get(state, "prev_update") is None
  opt = blaq_jax.blaq(0.05, diagnostics=True)
  _, state = steps(opt, *start(opt), 2)
  assert bool(optax.tree.get(state, "trial_active"))
  assert 0.0 <= float(optax.tree.get(state, "flip_fraction")) <= 1.0


def test_params_of_another_tree_name_optimizer_and_leaves():
  opt = blaq_jax.laq(0.05)
  params, state = start(opt)
  other = {"dense": {"kernel": params["dense"]["kernel"]},
           "head": {"kernel": params["dense"]["kernel"]}}
  with pytest.raises(ValueError, match=r"laq: params do not match .*"
                     r"only in params: \['head/kernel'\].*"
                     r"only in the state: \['dense/bias'\]"):
    opt.update(other, state, other)


def test_changed_shape_under_jit_names_the_leaf_and_both_shapes():
  opt = blaq_jax.blaq(0.05)
  params, state = start(opt)
  wider = {"dense": {"kernel": jnp.zeros((2, 4)), "bias": jnp.zeros(3)}}
  with pytest.raises(ValueError, match=r"blaq: leaf 'dense/kernel' has shape "
                     r"\(2, 4\).*made for shape \(2, 3\)"):
    jax.jit(lambda g, s, p: opt.update(g, s, p, grad_fn=jax.grad(loss)))(
        wider, state, wider)


def test_gradient_of_another_shape_is_named():
  opt = blaq_jax.laq(0.05)
  params, state = start(opt)
  grads = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(3)}}
  with pytest.raises(ValueError, match=r"gradient of leaf 'dense/kernel'"):
    opt.update(grads, state, params)


def test_old_state_layout_is_refused():
  Old = collections.namedtuple("LossAwareState",  # noqa: N806
                               "count mu nu latent quantized")
  opt = blaq_jax.laq(0.05)
  params, state = start(opt)
  old = Old(state.count, None, None, state.latent, state.quantized)
  with pytest.raises(ValueError, match="layout of blaq_jax 0.1"):
    opt.update(jax.grad(loss)(params), old, params)


def test_check_on_level_set_catches_a_transform_after_the_quantizer():
  opt = optax.chain(blaq_jax.laq(0.05), optax.scale(0.5))
  params, state = start(opt)
  blaq_jax.check_on_level_set(params, state)
  good = optax.chain(blaq_jax.laq(0.05))
  p_good, s_good = steps(good, *start(good), 3)
  blaq_jax.check_on_level_set(p_good, s_good)  # an ulp off is fine
  params, state = steps(opt, params, state, 1)
  with pytest.raises(ValueError, match="'dense/kernel' is off the "
                     "optimizer's level set.*must be the last one"):
    blaq_jax.check_on_level_set(params, state)


def test_engine_options_are_in_every_signature():
  import inspect  # pylint: disable=g-import-not-at-top
  for name in ("laq", "blaq", "ste", "bwn", "twn", "fogzo", "n_spsa"):
    params = inspect.signature(getattr(blaq_jax, name)).parameters
    assert {"quantize", "preprocess", "diagnostics", "channel_axis"} <= set(
        params), name
  assert "channel_axis" not in inspect.signature(
      blaq_jax.binary_connect).parameters
  with pytest.raises(TypeError, match="unexpected keyword.*chanel_axis"):
    blaq_jax.laq(0.1, chanel_axis=-1)


def test_preprocess_must_be_a_transform_not_its_factory():
  # A common slip: the factory optax.clip_by_global_norm, not a transform.
  with pytest.raises(TypeError, match="laq: preprocess must be an optax "
                     "GradientTransformation, got <function clip_by_global"):
    blaq_jax.laq(0.1, preprocess=optax.clip_by_global_norm)


def test_an_unknown_method_name_lists_the_known_ones():
  from blaq_jax import methods  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"Unknown method 'adam'; known: \["):
    methods.create("adam", 0.1)


@pytest.mark.parametrize("name", ["blaq", "ste"])
def test_state_can_be_donated_with_diagnostics_on(name):
  # Every state leaf is its own buffer: a step that donates the state runs.
  opt = {"blaq": blaq_jax.blaq, "ste": blaq_jax.ste}[name](
      0.05, diagnostics=True)
  params, state = start(opt)
  step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p,
                                         grad_fn=jax.grad(loss)),
                 donate_argnums=(1,))
  for _ in range(2):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert int(state.count) == 2
