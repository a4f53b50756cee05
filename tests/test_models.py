"""Tests of experiments.models and experiments.losses."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import blaq_jax
from blaq_jax.selection import default_quantize, path_str, resolve_bits
from experiments import losses, models

# Reduced widths: the same layer structure as the paper's models, small
# enough to run eagerly on CPU.
TINY = {
    "mlp": dict(hidden=(16, 16, 16)),
    "lenet5": dict(channels=(4, 6), hidden=(16,)),
    "vgg_small": dict(width=1 / 64),
    "svhn_net": dict(width=1 / 32),
    "resnet18": dict(width=4),
}
INPUT = {
    "mlp": (28, 28, 1),
    "lenet5": (28, 28, 1),
    "vgg_small": (32, 32, 3),
    "svhn_net": (32, 32, 3),
    "resnet18": (32, 32, 3),
}


def _loss(model, x, y):
  return losses.squared_hinge_loss(model(x), y)


@nnx.jit
def _forward_backward(model, x, y):
  loss, grads = nnx.value_and_grad(_loss)(model, x, y)
  return model(x), loss, grads


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_backward_tiny(name):
  classes = 7
  model = models.create_model(name, num_classes=classes, rngs=nnx.Rngs(0),
                              **TINY[name])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((4, *INPUT[name]), dtype=np.float32))
  y = jnp.asarray(rng.integers(0, classes, 4), dtype=jnp.int32)
  out, loss, grads = _forward_backward(model, x, y)
  chex.assert_shape(out, (4, classes))
  chex.assert_type(out, jnp.float32)
  assert jnp.isfinite(loss)
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]
  chex.assert_tree_all_finite(grads)
  kernels = [(path_str(p), g) for p, g in flat if path_str(p).endswith(
      "kernel")]
  assert kernels
  # Every dense/conv kernel receives gradient (none is disconnected).
  dead = [p for p, g in kernels if not jnp.any(g != 0)]
  assert not dead, dead


def test_full_size_mlp_forward():
  model = models.MLP(rngs=nnx.Rngs(0))
  kernels = [p.shape for p in jax.tree.leaves(nnx.state(model, nnx.Param))
             if p.ndim == 2]
  assert kernels == [(784, 2048), (2048, 2048), (2048, 2048), (2048, 10)]
  model.eval()
  out = model(jnp.ones((2, 28, 28, 1)))
  chex.assert_shape(out, (2, 10))
  chex.assert_tree_all_finite(out)


def test_paper_conv_shapes():
  # Kernel shapes of the paper's architectures, built abstractly (no FLOPs).
  def kernel_shapes(name, **kw):
    model = nnx.eval_shape(lambda: models.create_model(
        name, num_classes=10, rngs=nnx.Rngs(0), **kw))
    flat = jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    return [tuple(x.shape) for p, x in flat if path_str(p).endswith("kernel")]

  assert sorted(kernel_shapes("lenet5")) == sorted(
      [(3, 3, 1, 20), (3, 3, 20, 50), (7 * 7 * 50, 500), (500, 10)])
  vgg = kernel_shapes("vgg_small")
  assert (3, 3, 3, 128) in vgg and (3, 3, 512, 512) in vgg
  assert (4 * 4 * 512, 1024) in vgg and (1024, 10) in vgg
  assert len(vgg) == 9
  svhn = kernel_shapes("svhn_net")
  assert (3, 3, 3, 64) in svhn and (4 * 4 * 256, 1024) in svhn
  model = nnx.eval_shape(lambda: models.ResNet18(rngs=nnx.Rngs(0)))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  # ResNet-18 on ImageNet has about 11.7M parameters.
  assert 11.5e6 < n_params < 11.8e6, n_params


def test_batchnorm_train_eval_modes():
  model = models.MLP(hidden=(8, 8), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, (16, 784)),
                  jnp.float32)
  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
  train_out = model(x)
  after = nnx.state(model, nnx.BatchStat)
  # Training mode updates the running statistics...
  assert any(not jnp.allclose(a, b) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(after)))
  # ...and normalises with the batch's: the output has ~zero batch mean.
  chex.assert_trees_all_close(train_out.mean(0), jnp.zeros(10), atol=1e-4)
  model.eval()
  frozen = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
  eval_out = model(x)
  assert not jnp.allclose(eval_out, train_out, atol=1e-3)
  chex.assert_trees_all_equal(frozen, nnx.state(model, nnx.BatchStat))
  chex.assert_trees_all_close(model(x[:3]), eval_out[:3], rtol=1e-5,
                              atol=1e-5)
  model.train()
  assert not jnp.allclose(model(x[:3]), eval_out[:3], atol=1e-3)


def test_model_errors():
  with pytest.raises(ValueError, match="Unknown model 'vgg'"):
    models.create_model("vgg", num_classes=10, rngs=nnx.Rngs(0))
  net = models.LeNet5(channels=(2, 2), hidden=(4,), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"built for images of shape"):
    net(jnp.ones((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="in_features=784"):
    models.MLP(hidden=(4,), rngs=nnx.Rngs(0))(jnp.ones((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="stem"):
    models.ResNet18(stem="tiny", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="too small"):
    models.VGGSmall(width=1 / 64, image_shape=(4, 4, 3), rngs=nnx.Rngs(0))


def _bits_by_path(model, rule, bits):
  for state in (nnx.state(model, nnx.Param),
                nnx.to_pure_dict(nnx.state(model, nnx.Param))):
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    got = resolve_bits(state, rule, bits=bits, kind="linear")
    paths = [path_str(p).removesuffix("/value") for p, _ in flat]
    yield dict(zip(paths, got))


def test_quantize_rule_resnet18_first_last_8_bits():
  model = models.ResNet18(width=4, num_classes=5, rngs=nnx.Rngs(0))
  rule = models.quantize_rule("resnet18", 2)
  for bits in _bits_by_path(model, rule, 2):
    eight = sorted(p for p, b in bits.items() if b == 8)
    assert eight == ["head/kernel", "stem_conv/kernel"]
    two = [p for p, b in bits.items() if b == 2]
    # 8 blocks x 2 convs + 3 projection shortcuts.
    assert len(two) == 19 and all(p.startswith("blocks/") for p in two)
    assert all(p.endswith("kernel") for p in two)
    full = [p for p, b in bits.items() if b == 0]
    assert "head/bias" in full and all(not p.endswith("kernel") for p in full)


@pytest.mark.parametrize("name", ["mlp", "lenet5", "vgg_small"])
def test_quantize_rule_default_for_paper_models(name):
  model = models.create_model(name, num_classes=10, rngs=nnx.Rngs(0),
                              **TINY[name])
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  got = resolve_bits(params, models.quantize_rule(name, 1), bits=1,
                     kind="blaq")
  want = resolve_bits(params, default_quantize, bits=1, kind="blaq")
  assert got == want and sum(got) > 0
  with pytest.raises(ValueError, match="Unknown model"):
    models.quantize_rule("alexnet", 1)


def test_resnet_rule_drives_blaq_levels():
  # With the rule, one LAQ step leaves the first/last kernels on the
  # multi-bit levels (edge_bits=2 keeps the test fast; 4 values available)
  # and the others on 1 bit (2 values).
  model = models.ResNet18(width=4, num_classes=5, stage_sizes=(1, 1),
                          stem="cifar", rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(
      model, blaq_jax.laq(1e-2, bits=1,
                          quantize=models.quantize_rule("resnet18", 1,
                                                        edge_bits=2)),
      wrt=nnx.Param)
  x = jnp.asarray(np.random.default_rng(0).random((4, 8, 8, 3)), jnp.float32)
  y = jnp.arange(4, dtype=jnp.int32)

  @nnx.jit
  def step(model, opt, x, y):
    opt.update(model, nnx.grad(_loss)(model, x, y))

  step(model, opt, x, y)
  for edge in (model.stem_conv, model.head):
    assert 2 < len(np.unique(np.asarray(edge.kernel[...]))) <= 4
  for block in model.blocks:
    assert len(np.unique(np.asarray(block.conv1.kernel[...]))) == 2


# --------------------------------------------------------------- losses --

def test_squared_hinge_matches_definition():
  rng = np.random.default_rng(0)
  o = rng.normal(size=(6, 4)).astype(np.float32)
  y = rng.integers(0, 4, 6)
  want = 0.0
  for i in range(6):
    for c in range(4):
      t = 1.0 if c == y[i] else -1.0
      want += max(0.0, 1.0 - t * o[i, c]) ** 2
  got = losses.squared_hinge_loss(jnp.asarray(o), jnp.asarray(y))
  np.testing.assert_allclose(got, want / 24, rtol=1e-6)
  summed = losses.squared_hinge_loss(jnp.asarray(o), jnp.asarray(y),
                                     reduction="sum_classes")
  np.testing.assert_allclose(summed, want / 6, rtol=1e-6)
  # Perfect margins give zero loss and zero gradient.
  perfect = 2.0 * jax.nn.one_hot(y, 4) - 1.0
  loss, grad = jax.value_and_grad(losses.squared_hinge_loss)(
      1.5 * perfect, jnp.asarray(y))
  assert loss == 0 and not jnp.any(grad)


def test_cross_entropy_and_accuracy():
  rng = np.random.default_rng(1)
  o = rng.normal(size=(5, 3)).astype(np.float32)
  y = rng.integers(0, 3, 5)
  logp = o - np.log(np.exp(o).sum(-1, keepdims=True))
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(o),
                                                  jnp.asarray(y)),
                             -logp[np.arange(5), y].mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.accuracy(jnp.asarray(o), jnp.asarray(y)),
                             (o.argmax(-1) == y).mean())
  assert set(losses.LOSSES) == {"squared_hinge", "cross_entropy"}


def test_loss_input_errors():
  o = jnp.zeros((3, 4))
  with pytest.raises(TypeError, match="integer class ids"):
    losses.squared_hinge_loss(o, jnp.zeros(3))
  with pytest.raises(ValueError, match=r"shape \[3\]"):
    losses.cross_entropy(o, jnp.zeros((3, 4), jnp.int32))
  with pytest.raises(ValueError, match="unknown reduction"):
    losses.squared_hinge_loss(o, jnp.zeros(3, jnp.int32), reduction="sum")
  with pytest.raises(ValueError, match="batch, classes"):
    losses.accuracy(jnp.zeros(3), jnp.zeros(3, jnp.int32))


def test_losses_jit_and_optax_agree():
  o = jnp.asarray(np.random.default_rng(2).normal(size=(4, 10)), jnp.float32)
  y = jnp.arange(4, dtype=jnp.int32)
  chex.assert_trees_all_close(
      jax.jit(losses.cross_entropy)(o, y),
      optax.softmax_cross_entropy(o, jax.nn.one_hot(y, 10)).mean(),
      rtol=1e-6)
