"""MNIST, LeNet5 variant 20C3-MP2-50C3-MP2-500FC-10 L2-SVM, 1 bit (Table 3).

Paper: batch 128, 20 epochs, a = 0.6, m = 5. Reported BLAQ 99.38 (FP 99.19).
The paper states no learning rate for this table: the MLP's (0.005 decayed
x0.1 every 5 epochs) is used.
"""

import ml_collections

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model = "lenet5"
  c.model_options = ml_collections.ConfigDict(
      {"channels": (20, 50), "hidden": (500,)})
  c.batch_size = 128
  c.num_epochs = 20
  return c
