"""The papers' models in Flax NNX, with the quantization rule of each.

All models take NHWC float images and return ``[batch, num_classes]``
scores (an L2-SVM output layer when trained with the squared hinge loss of
:mod:`experiments.losses`). As in BinaryConnect and LAB/LAQ, every hidden
dense or conv layer is followed by batch norm and ReLU, and the output layer
by a batch norm (``output_bn=True``; the L2-SVM scores then have a learned
scale and offset). A layer followed by batch norm has no bias (the norm's
offset takes its place). Dense and conv weights are ``kernel`` leaves, so
:func:`blaq_jax.selection.default_quantize` picks them; biases and batch-norm
parameters stay full precision.

Batch norm follows NNX's mode: ``model.train()`` normalises with the batch
statistics and updates the running averages, ``model.eval()`` uses the
running averages.

=========== ========================================================= =======
name        architecture (paper)                                      input
=========== ========================================================= =======
mlp         784FC-2048FC-2048FC-2048FC-10                             MNIST
lenet5      20C3-MP2-50C3-MP2-500FC-10                                MNIST
vgg_small   (2x128C3)-MP2-(2x256C3)-MP2-(2x512C3)-MP2-(2x1024FC)-10   CIFAR
svhn_net    (2x64C3)-MP2-(2x128C3)-MP2-(2x256C3)-MP2-(2x1024FC)-10    SVHN
resnet18    ResNet-18 (basic blocks 2-2-2-2), first/last layer 8 bits ImageNet
=========== ========================================================= =======

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from experiments.models import create_model
  >>> model = create_model("mlp", num_classes=10, rngs=nnx.Rngs(0),
  ...                      hidden=(16, 16))
  >>> model(jnp.zeros((4, 28, 28, 1))).shape
  (4, 10)
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from blaq_jax.selection import default_quantize
from blaq_jax.selection import path_str

# Momentum of the running averages (Lasagne's BatchNormLayer alpha = 0.1).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-4


def _bn(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                       rngs=rngs)


def _check_image(x, who: str):
  if x.ndim != 4:
    raise ValueError(f"{who}: expected NHWC images [batch, height, width, "
                     f"channels], got shape {x.shape}.")


class MLP(nnx.Module):
  """Fully connected net: ``(FC-BN-ReLU) x len(hidden)``, then FC(-BN).

  Args:
    num_classes: output units.
    rngs: NNX random streams for the initialisers.
    hidden: hidden layer widths (paper: three layers of 2048).
    in_features: flattened input size (28 * 28 for MNIST).
    output_bn: batch norm on the output layer, as in LAB's code.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> MLP(hidden=(8,), rngs=nnx.Rngs(0))(jnp.ones((2, 28, 28, 1))).shape
    (2, 10)
  """

  def __init__(self, *, num_classes: int = 10, rngs: nnx.Rngs,
               hidden: Sequence[int] = (2048, 2048, 2048),
               in_features: int = 784, output_bn: bool = True):
    sizes = (in_features, *hidden)
    # No bias before a batch norm: it would be cancelled by the mean
    # subtraction, its gradient pure rounding noise that Adam's
    # normalisation turns into O(lr) random steps.
    self.dense = nnx.List([nnx.Linear(a, b, use_bias=False, rngs=rngs)
                           for a, b in zip(sizes[:-1], sizes[1:])])
    self.norm = nnx.List([_bn(b, rngs) for b in hidden])
    self.head = nnx.Linear(sizes[-1], num_classes, use_bias=not output_bn,
                           rngs=rngs)
    self.head_norm = _bn(num_classes, rngs) if output_bn else None
    self.in_features = in_features

  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    if x.shape[-1] != self.in_features:
      raise ValueError(f"MLP: inputs flatten to {x.shape[-1]} features, the "
                       f"model expects in_features={self.in_features}.")
    for dense, norm in zip(self.dense, self.norm):
      x = nnx.relu(norm(dense(x)))
    x = self.head(x)
    return x if self.head_norm is None else self.head_norm(x)


class _ConvBlock(nnx.Module):
  """``n`` times 3x3 Conv-BN-ReLU, then 2x2 max pooling."""

  def __init__(self, in_ch: int, out_ch: int, n: int, padding: str,
               rngs: nnx.Rngs):
    chans = (in_ch,) + (out_ch,) * n
    self.conv = nnx.List([nnx.Conv(a, b, (3, 3), padding=padding,
                                   use_bias=False, rngs=rngs)
                          for a, b in zip(chans[:-1], chans[1:])])
    self.norm = nnx.List([_bn(out_ch, rngs) for _ in range(n)])

  def __call__(self, x):
    for conv, norm in zip(self.conv, self.norm):
      x = nnx.relu(norm(conv(x)))
    return nnx.max_pool(x, (2, 2), strides=(2, 2))


class _ConvNet(nnx.Module):
  """Conv blocks, then ``(FC-BN-ReLU) x len(hidden)``, then FC(-BN)."""

  def __init__(self, *, num_classes: int, rngs: nnx.Rngs,
               channels: Sequence[int], convs_per_block: int,
               hidden: Sequence[int], image_shape: Sequence[int],
               padding: str = "SAME", output_bn: bool = True):
    height, width, in_ch = image_shape
    blocks = []
    for out_ch in channels:
      blocks.append(_ConvBlock(in_ch, out_ch, convs_per_block, padding, rngs))
      if padding == "VALID":
        height, width = height - 2 * convs_per_block, width - 2 * convs_per_block
      height, width, in_ch = height // 2, width // 2, out_ch
    if height < 1 or width < 1:
      raise ValueError(f"{type(self).__name__}: images of shape "
                       f"{tuple(image_shape)} are too small for "
                       f"{len(channels)} conv blocks.")
    self.blocks = nnx.List(blocks)
    self.image_shape = tuple(image_shape)
    self.head_mlp = MLP(num_classes=num_classes, rngs=rngs, hidden=hidden,
                        in_features=height * width * in_ch,
                        output_bn=output_bn)

  def __call__(self, x):
    _check_image(x, type(self).__name__)
    if tuple(x.shape[1:]) != self.image_shape:
      raise ValueError(f"{type(self).__name__}: built for images of shape "
                       f"{self.image_shape} (image_shape=...), got "
                       f"{tuple(x.shape[1:])}.")
    for block in self.blocks:
      x = block(x)
    return self.head_mlp(x)


def _scaled(sizes: Sequence[int], width: float) -> tuple[int, ...]:
  if width <= 0:
    raise ValueError(f"width must be positive, got {width}.")
  return tuple(max(1, int(round(s * width))) for s in sizes)


class LeNet5(_ConvNet):
  """LeNet5 variant 20C3-MP2-50C3-MP2-500FC-10 (BN + ReLU after each layer).

  Args:
    num_classes: output units.
    rngs: NNX random streams.
    channels: conv widths (paper: 20, 50).
    hidden: FC widths (paper: 500).
    image_shape: ``(H, W, C)`` of the inputs (MNIST: 28, 28, 1).
    padding: ``"SAME"`` (default) or ``"VALID"`` for the 3x3 convolutions.
    output_bn: batch norm on the output layer.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> net = nnx.eval_shape(lambda: LeNet5(rngs=nnx.Rngs(0)))  # abstract
    >>> net.head_mlp.dense[0].kernel.shape  # 50 maps of 7x7 -> 500
    (2450, 500)
  """

  def __init__(self, *, num_classes: int = 10, rngs: nnx.Rngs,
               channels: Sequence[int] = (20, 50),
               hidden: Sequence[int] = (500,),
               image_shape: Sequence[int] = (28, 28, 1), **options):
    super().__init__(num_classes=num_classes, rngs=rngs, channels=channels,
                     convs_per_block=1, hidden=hidden,
                     image_shape=image_shape, **options)


class VGGSmall(_ConvNet):
  """The CIFAR-10 VGG: (2x128C3)-MP2-(2x256C3)-MP2-(2x512C3)-MP2-(2x1024FC)-10.

  Args:
    num_classes: output units.
    rngs: NNX random streams.
    width: multiplies every conv and FC width (tests use small values).
    channels: conv widths per block before ``width`` scaling.
    hidden: FC widths before ``width`` scaling.
    image_shape: ``(H, W, C)`` of the inputs (CIFAR: 32, 32, 3).
    **options: ``padding``, ``output_bn``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> net = VGGSmall(width=1 / 64, rngs=nnx.Rngs(0))
    >>> net(jnp.ones((2, 32, 32, 3))).shape
    (2, 10)
  """

  def __init__(self, *, num_classes: int = 10, rngs: nnx.Rngs,
               width: float = 1.0, channels: Sequence[int] = (128, 256, 512),
               hidden: Sequence[int] = (1024, 1024),
               image_shape: Sequence[int] = (32, 32, 3), **options):
    super().__init__(num_classes=num_classes, rngs=rngs,
                     channels=_scaled(channels, width), convs_per_block=2,
                     hidden=_scaled(hidden, width), image_shape=image_shape,
                     **options)


class SVHNNet(VGGSmall):
  """The SVHN net: (2x64C3)-MP2-(2x128C3)-MP2-(2x256C3)-MP2-(2x1024FC)-10.

  Same options as :class:`VGGSmall`, with the paper's narrower convolutions.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> net = nnx.eval_shape(lambda: SVHNNet(rngs=nnx.Rngs(0)))
    >>> [block.conv[1].kernel.shape[-1] for block in net.blocks]
    [64, 128, 256]
  """

  def __init__(self, *, num_classes: int = 10, rngs: nnx.Rngs,
               channels: Sequence[int] = (64, 128, 256), **options):
    super().__init__(num_classes=num_classes, rngs=rngs, channels=channels,
                     **options)


class _BasicBlock(nnx.Module):
  """ResNet basic block: two 3x3 Conv-BN, identity or 1x1 projection skip."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_ch, out_ch, (3, 3), strides=stride,
                          padding="SAME", use_bias=False, rngs=rngs)
    self.bn1 = _bn(out_ch, rngs)
    self.conv2 = nnx.Conv(out_ch, out_ch, (3, 3), padding="SAME",
                          use_bias=False, rngs=rngs)
    self.bn2 = _bn(out_ch, rngs)
    if stride != 1 or in_ch != out_ch:
      self.proj = nnx.Conv(in_ch, out_ch, (1, 1), strides=stride,
                           use_bias=False, rngs=rngs)
      self.proj_bn = _bn(out_ch, rngs)
    else:
      self.proj = self.proj_bn = None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    skip = x if self.proj is None else self.proj_bn(self.proj(x))
    return nnx.relu(y + skip)


class ResNet18(nnx.Module):
  """ResNet-18 (He et al. 2016): stem, 4 stages of 2 basic blocks, FC.

  The first layer (``stem_conv``) and the last (``head``) are the layers the
  paper keeps at 8 bits (see :func:`quantize_rule`).

  Args:
    num_classes: output units (ImageNet: 1000).
    rngs: NNX random streams.
    width: channels of the first stage (64); stages double it.
    stage_sizes: blocks per stage (ResNet-18: 2, 2, 2, 2).
    stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max pool) or ``"cifar"``
      (3x3/1 conv, no pooling) for small images.
    in_channels: image channels.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> net = ResNet18(width=4, num_classes=5, stage_sizes=(1, 1),
    ...                stem="cifar", rngs=nnx.Rngs(0))
    >>> net(jnp.ones((2, 8, 8, 3))).shape
    (2, 5)
  """

  def __init__(self, *, num_classes: int = 1000, rngs: nnx.Rngs,
               width: int = 64, stage_sizes: Sequence[int] = (2, 2, 2, 2),
               stem: str = "imagenet", in_channels: int = 3):
    if stem not in ("imagenet", "cifar"):
      raise ValueError(f"ResNet18: stem must be 'imagenet' or 'cifar', got "
                       f"{stem!r}.")
    self.stem = stem
    k, s = ((7, 7), 2) if stem == "imagenet" else ((3, 3), 1)
    self.stem_conv = nnx.Conv(in_channels, width, k, strides=s,
                              padding="SAME", use_bias=False, rngs=rngs)
    self.stem_bn = _bn(width, rngs)
    blocks, in_ch = [], width
    for i, n in enumerate(stage_sizes):
      out_ch = width * 2 ** i
      for j in range(n):
        blocks.append(_BasicBlock(in_ch, out_ch,
                                  2 if (i > 0 and j == 0) else 1, rngs))
        in_ch = out_ch
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(in_ch, num_classes, rngs=rngs)

  def __call__(self, x):
    _check_image(x, "ResNet18")
    x = nnx.relu(self.stem_bn(self.stem_conv(x)))
    if self.stem == "imagenet":
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


MODELS = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "vgg_small": VGGSmall,
    "svhn_net": SVHNNet,
    "resnet18": ResNet18,
}


def create_model(name: str, *, num_classes: int, rngs: nnx.Rngs,
                 **options) -> nnx.Module:
  """Builds the model called ``name`` (one of :data:`MODELS`).

  Args:
    name: ``"mlp"``, ``"lenet5"``, ``"vgg_small"``, ``"svhn_net"`` or
      ``"resnet18"``.
    num_classes: output units.
    rngs: NNX random streams.
    **options: the model's keyword options (widths, ``image_shape``, ...).

  Returns:
    The NNX module (in training mode).

  Examples:
    >>> from flax import nnx
    >>> type(create_model("lenet5", num_classes=10, rngs=nnx.Rngs(0))).__name__
    'LeNet5'
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of "
                     f"{sorted(MODELS)}.")
  return MODELS[name](num_classes=num_classes, rngs=rngs, **options)


# The layers ResNet-18 keeps at 8 bits: the first conv and the classifier.
_RESNET_EDGE_LAYERS = ("stem_conv", "head")


def _names(path) -> list[str]:
  names = path_str(path).split("/")
  # nnx.State leaves flatten with a trailing ".value" attribute.
  return names[:-1] if names and names[-1] == "value" else names


def quantize_rule(name: str, bits: int, *,
                  edge_bits: int = 8) -> Callable[..., int | bool]:
  """The blaq_jax ``quantize`` rule the paper uses for model ``name``.

  ``resnet18``: the first conv and the last dense layer at ``edge_bits`` (8),
  every other conv/dense kernel at ``bits``. Other models: every dense/conv
  kernel at ``bits`` (:func:`blaq_jax.selection.default_quantize`).
  Biases and batch-norm parameters always stay full precision.

  Args:
    name: the model name (see :data:`MODELS`).
    bits: the bit width of the quantized layers.
    edge_bits: the bit width of ResNet-18's first and last layers.

  Returns:
    ``rule(path, leaf) -> int | bool`` for a ``quantize=`` argument.

  Examples:
    >>> import jax.numpy as jnp
    >>> rule = quantize_rule("resnet18", 1)
    >>> params = {"stem_conv": {"kernel": jnp.ones((7, 7, 3, 8))},
    ...           "blocks": [{"conv1": {"kernel": jnp.ones((3, 3, 8, 8))}}],
    ...           "head": {"kernel": jnp.ones((8, 10)), "bias": jnp.ones(10)}}
    >>> from blaq_jax.selection import resolve_bits
    >>> resolve_bits(params, rule, bits=1, kind="blaq")
    [1, 0, 8, 8]
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of "
                     f"{sorted(MODELS)}.")

  def is_kernel(path, leaf) -> bool:
    names = _names(path)
    return bool(names) and names[-1] == "kernel" and jnp.ndim(leaf) >= 2

  if name != "resnet18":
    def rule(path, leaf):
      return bits if (default_quantize(path, leaf)
                      or is_kernel(path, leaf)) else 0
    return rule

  def resnet_rule(path, leaf):
    if not is_kernel(path, leaf):
      return 0
    return edge_bits if _names(path)[0] in _RESNET_EDGE_LAYERS else bits
  return resnet_rule
