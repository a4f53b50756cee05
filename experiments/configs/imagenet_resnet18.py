"""ImageNet, ResNet-18 with first and last layers at 8 bits (Table 6).

Paper: batch 256, 175 epochs, lr 2e-4 decayed x0.95 per epoch, a = 0.9,
m = 10; 1 bit (BLAQ 66.73) and 2 bits (``--config.bits=2``, BLAQ 69.62);
FP 69.8. The loss is cross-entropy (a 1000-way L2-SVM is not what ResNet
baselines use). Needs ``blaq_jax[tfds]`` and a prepared ``imagenet2012``;
``--config.dataset=synthetic_imagenet`` (64x64, random learnable classes)
exercises the same code path without it.
"""

import ml_collections

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.dataset = "imagenet2012"
  c.model = "resnet18"
  c.model_options = ml_collections.ConfigDict({"width": 64})
  c.loss = "cross_entropy"
  c.batch_size = 256
  c.num_epochs = 175
  c.learning_rate = 2e-4
  c.lr_decay_rate = 0.95
  c.lr_decay_every_epochs = 1
  c.a = 0.9
  c.blaq_period_epochs = 10
  c.edge_bits = 8
  c.eval_batch_size = 256
  c.log_every_steps = 100
  return c
