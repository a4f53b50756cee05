"""MNIST, 784FC-2048FC-2048FC-2048FC-10 L2-SVM, 1 bit (the paper's Table 2).

Paper: 50k/10k/10k split, batch 100, 50 epochs, lr 0.005 decayed x0.1
every 5 epochs, a = 0.6, m = 5. Reported: FP 98.81, BC 98.72, BWN 98.69,
LAQ 98.82, BLAQ 99.11.

  python -m experiments.train --config experiments/configs/mnist_mlp.py \
      --workdir runs/mnist_mlp --config.method=laq
"""

from experiments.configs import default


def get_config():
  return default.get_config()
