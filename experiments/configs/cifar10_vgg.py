"""CIFAR-10, VGG (2x128C3)-MP2-(2x256C3)-MP2-(2x512C3)-MP2-(2x1024FC)-10 (Table 4).

Paper: 45k/5k/10k split, batch 100, 100 epochs, lr 0.02 decayed x0.1 every
5 epochs (as METHOD.md states it), a = 0.6, m = 5, 1 bit. Reported: FP 92.8,
BC 90.1, BWN 89.5, LAQ 89.5, BLAQ 91.5. Needs ``blaq_jax[tfds]`` for
``cifar10``; ``--config.dataset=synthetic_cifar10`` runs without it.
"""

import ml_collections

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.dataset = "cifar10"
  c.model = "vgg_small"
  c.model_options = ml_collections.ConfigDict({"width": 1.0})
  c.batch_size = 100
  c.num_epochs = 100
  c.learning_rate = 0.02
  c.lr_decay_rate = 0.1
  c.lr_decay_every_epochs = 5
  c.eval_batch_size = 500
  return c
