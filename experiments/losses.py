"""Losses and metrics for the classification experiments.

The papers (BinaryConnect, LAB/LAQ, BLAQ) train an L2-SVM output layer with
the squared hinge loss; cross-entropy is offered as an option.

Example:
  >>> import jax.numpy as jnp
  >>> from experiments.losses import LOSSES, accuracy
  >>> outputs = jnp.array([[2.0, -1.0], [0.5, 0.3]])
  >>> labels = jnp.array([0, 1])
  >>> round(float(LOSSES["squared_hinge"](outputs, labels)), 4)
  0.685
  >>> float(accuracy(outputs, labels))
  0.5
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _check(outputs, labels, who: str):
  if outputs.ndim != 2:
    raise ValueError(f"{who}: outputs must be [batch, classes], got shape "
                     f"{outputs.shape}.")
  if labels.shape != outputs.shape[:1]:
    raise ValueError(f"{who}: labels must be integer class ids of shape "
                     f"[{outputs.shape[0]}], got shape {labels.shape}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{who}: labels must be integer class ids, got dtype "
                    f"{labels.dtype}.")


def squared_hinge_loss(outputs, labels, *, reduction: str = "mean"):
  r"""The L2-SVM (squared hinge) loss of multi-class one-vs-rest outputs.

  With targets :math:`t_{ic} = +1` for the true class and :math:`-1`
  otherwise,

  .. math::
    \ell = \frac{1}{B C} \sum_{i=1}^{B} \sum_{c=1}^{C}
      \max(0, 1 - t_{ic} o_{ic})^2 .

  The default ``reduction="mean"`` averages over the batch *and* the classes,
  which is the convention of the BinaryConnect / LAB code the papers build on
  (``T.mean(T.sqr(T.maximum(0., 1. - target * output)))``);
  ``reduction="sum_classes"`` sums over classes and averages over the batch
  (C times larger; with Adam-type optimizers the difference is only in the
  effect of ``eps``).

  Args:
    outputs: ``[batch, classes]`` real scores.
    labels: ``[batch]`` integer class ids.
    reduction: ``"mean"`` or ``"sum_classes"``.

  Returns:
    A scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> o = jnp.array([[1.0, -1.0, 0.0]])
    >>> round(float(squared_hinge_loss(o, jnp.array([0]))), 4)  # class 2 only
    0.3333
    >>> float(squared_hinge_loss(o, jnp.array([0]), reduction="sum_classes"))
    1.0
  """
  _check(outputs, labels, "squared_hinge_loss")
  targets = 2.0 * jax.nn.one_hot(labels, outputs.shape[-1],
                                 dtype=outputs.dtype) - 1.0
  per_entry = jnp.square(jnp.maximum(0.0, 1.0 - targets * outputs))
  if reduction == "mean":
    return jnp.mean(per_entry)
  if reduction == "sum_classes":
    return jnp.mean(jnp.sum(per_entry, axis=-1))
  raise ValueError(f"squared_hinge_loss: unknown reduction {reduction!r}; "
                   "use 'mean' or 'sum_classes'.")


def cross_entropy(logits, labels):
  r"""Mean softmax cross-entropy :math:`-\frac1B\sum_i \log
  \mathrm{softmax}(o_i)_{y_i}`.

  Args:
    logits: ``[batch, classes]``.
    labels: ``[batch]`` integer class ids.

  Returns:
    A scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> round(float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)
    1.3863
  """
  _check(logits, labels, "cross_entropy")
  return jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(outputs, labels):
  """Fraction of rows whose arg-max is the label (ties: the first class).

  Examples:
    >>> import jax.numpy as jnp
    >>> float(accuracy(jnp.array([[0.1, 0.9], [0.8, 0.2]]), jnp.array([1, 1])))
    0.5
  """
  _check(outputs, labels, "accuracy")
  return jnp.mean(jnp.argmax(outputs, axis=-1) == labels)


LOSSES = {
    "squared_hinge": squared_hinge_loss,
    "cross_entropy": cross_entropy,
}
