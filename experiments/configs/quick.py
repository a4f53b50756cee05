"""A few-minute run on 2 CPU cores: a narrow MNIST MLP on a subset.

The MLP of Table 2 with 3 hidden layers of 256 instead of 2048, on the
paper's MNIST split (50k/10k/10k), 1 bit, batch 100, 6 epochs, lr 0.005
decayed x0.1 every 3 epochs. BLAQ's two-stage update runs one epoch in 2
(m = 2 instead of the paper's 5, so that it is active in a run this short).
Tests shrink it further (``train_size``, ``test_size``, widths).

  python -m experiments.compare --config experiments/configs/quick.py \
      --methods laq,blaq --workdir runs/quick
"""

import ml_collections

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model_options = ml_collections.ConfigDict({"hidden": (256, 256, 256)})
  c.num_epochs = 6
  c.lr_decay_every_epochs = 3
  c.blaq_period_epochs = 2
  c.log_every_steps = 5
  return c
