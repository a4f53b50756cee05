"""The regime map's grid on the quick MLP, sized for 2 CPU cores in about an hour.

Fixed before the runs (issue 16): 8 paired seeds; the first 6,000 examples
of the 50k training split, 5 epochs of 60 steps (batch 100), the learning
rate x0.1 over the last epoch only; the full 10k validation and 10k test
splits evaluated after every epoch; a = 0.6, BLAQ active on every step.
Targets of the epochs-to-accuracy table, chosen before any run of this grid:
MNIST 96%, Fashion-MNIST 84% (test accuracy). They were fixed for a first
plan of 10,000 examples x 5 epochs; that plan was cut to 6,000 x 5 after its
first cell (Fashion-MNIST, 1 bit, LAQ, lr 0.005) ran at 80 s on the loaded
cores, and the targets were kept as fixed, not moved after seeing it.

  python -m experiments.regime run --datasets fashion_mnist,mnist --bits 1,2 \
      --lrs 0.005,0.015,0.045 --seeds 8 --epochs 5 --decay_epochs 1 \
      --train_size 6000 --commit
  python -m experiments.regime report --targets fashion_mnist=0.84,mnist=0.96
"""

DATASETS = ("fashion_mnist", "mnist")
BITS = (1, 2)
LEARNING_RATES = (0.005, 0.015, 0.045)
SETTINGS = dict(seeds=8, epochs=5, decay_epochs=1, decay=0.1,
                train_size=6000, validation_size=0, test_size=0,
                batch_size=100, a=0.6, model="mlp")
TARGETS = {"fashion_mnist": 0.84, "mnist": 0.96}
