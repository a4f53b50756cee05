"""SVHN, (2x64C3)-MP2-(2x128C3)-MP2-(2x256C3)-MP2-(2x1024FC)-10 (Table 5).

Paper: batch 50, 50 epochs, lr 0.001, a = 0.6, m = 5, 1 bit. Reported: FP
97.73, BC 97.55, BWN 97.46, LAQ 97.64, BLAQ 98.13. The paper states no decay
for this table: the learning rate is constant. Needs ``blaq_jax[tfds]``
(``svhn_cropped``); ``--config.dataset=synthetic_svhn`` runs without it.
"""

import ml_collections

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.dataset = "svhn_cropped"
  c.model = "svhn_net"
  c.model_options = ml_collections.ConfigDict({"width": 1.0})
  c.batch_size = 50
  c.num_epochs = 50
  c.learning_rate = 0.001
  c.lr_decay_rate = 1.0
  c.lr_decay_every_epochs = 1
  c.eval_batch_size = 500
  return c
