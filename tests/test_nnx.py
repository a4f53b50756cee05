"""Every transform inside ``nnx.Optimizer``, many jitted steps.

``nnx.Optimizer`` gives ``init`` a state of ``Variable``s and writes the
state back after each update with ``nnx.update``; a quantized leaf's codes
and scale must survive that round trip on every step, not just the first.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import blaq_jax


class Net(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(6, 16, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.bn(self.fc1(x))))


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


TRANSFORMS = {
    "blaq_in_chain": lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        blaq_jax.blaq(1e-2, active=blaq_jax.every_n_steps(2))),
    "laq_2bit": lambda: blaq_jax.laq(1e-2, bits=2),
    "bwn": lambda: blaq_jax.bwn(1e-2),
    "fogzo": lambda: blaq_jax.fogzo(1e-2, bits=2, quantizer="uniform"),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_nnx_optimizer_trains_on_the_level_set(name):
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, TRANSFORMS[name](), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (32, 6))
  y = jax.random.randint(jax.random.key(2), (32,), 0, 3)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(
        model, grads,
        grad_fn=blaq_jax.nnx_grad_fn(model, loss_fn, x, y),
        loss_fn=blaq_jax.nnx_loss_fn(model, loss_fn, x, y))
    return loss

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
  assert losses[-1] < losses[0]
  qts = blaq_jax.quantized_tensors(optimizer.opt_state)
  for layer in ("fc1", "fc2"):
    qt = qts[layer]["kernel"]
    assert isinstance(qt, blaq_jax.QuantizedTensor)
    np.testing.assert_allclose(getattr(model, layer).kernel[...],
                               qt.dequantize(), rtol=1e-6)
  assert int(optimizer.step[...]) == 20


def test_nnx_loss_fn_is_the_loss_at_other_params():
  model = Net(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 6))
  y = jnp.zeros(8, jnp.int32)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  f = blaq_jax.nnx_loss_fn(model, loss_fn, x, y)
  np.testing.assert_allclose(f(params), loss_fn(model, x, y), rtol=1e-6)
  doubled = jax.tree.map(lambda p: 2 * p, params)
  assert not np.isclose(float(f(doubled)), float(f(params)))
  g = blaq_jax.nnx_grad_fn(model, loss_fn, x, y)(params)
  assert jax.tree.structure(g) == jax.tree.structure(params)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_split_state_of_variables_trains_on_the_level_set(name):
  """The functional pattern: ``nnx.split`` params (Variables inside) passed
  to ``init`` and ``update`` directly, without ``nnx.Optimizer``."""
  model = Net(nnx.Rngs(0))
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rest = nnx.as_pure(rest)
  opt = TRANSFORMS[name]()
  opt_state = opt.init(params)
  x = jax.random.normal(jax.random.key(1), (32, 6))
  y = jax.random.randint(jax.random.key(2), (32,), 0, 3)

  @jax.jit
  def step(params, rest, opt_state):
    def loss(p, rest):
      m = nnx.merge(graphdef, p, rest)  # rest is pure: fresh Variables
      return loss_fn(m, x, y), nnx.as_pure(nnx.state(m, nnx.Not(nnx.Param)))
    (value, new_rest), grads = jax.value_and_grad(loss, has_aux=True)(
        params, rest)
    updates, opt_state = opt.update(
        grads, opt_state, params,
        grad_fn=lambda p: jax.grad(lambda p: loss(p, rest)[0])(p),
        loss_fn=lambda p: loss(p, rest)[0])
    return optax.apply_updates(params, updates), new_rest, opt_state, value

  losses = []
  for _ in range(12):
    params, rest, opt_state, value = step(params, rest, opt_state)
    losses.append(float(value))
  assert losses[-1] < losses[0]
  q = blaq_jax.quantized_params(params, opt_state)
  for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  qts = blaq_jax.quantized_tensors(opt_state)
  assert isinstance(qts["fc1"]["kernel"], blaq_jax.QuantizedTensor)
