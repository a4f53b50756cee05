"""LeNet5 on Fashion-MNIST: LAQ against BLAQ (lookahead reading), zig-zag.

The paper's LeNet5 settings (Table 4: 20C3-MP2-50C3-MP2-500FC-10, batch 128,
Adam lr 0.005, a = 0.6, 1 bit) shortened to fit what was left of 2 shared
CPU cores: 5 paired seeds, the first 3,200 training examples (25 steps per
epoch), 3 epochs with the learning rate x0.1 over the last one only (the
paper: x0.1 every 5 epochs of 20), 1,000 validation and 2,000 test
examples. BLAQ runs on every step (m = 1; the paper: one epoch in 5), so the
zig-zag window (epochs 2..3, 50 steps) holds only active steps.
A first plan (6,400 examples x 4 epochs, 2,000/5,000 evaluation examples)
was stopped during LAQ's second epoch: its first epoch took 490 s on the
loaded cores, which left no time for BLAQ. The reading
(lookahead) is the one of the regime map's MLP grid with the largest or
near-largest gain in most cells (experiments/results/regime/summary.md).
Target of the epochs-to-accuracy line, fixed before the runs: 85% test
(fixed for the first plan and kept).

  python -m experiments.regime lenet5 --blend lookahead --seeds 5 \
      --epochs 3 --decay_epochs 1 --train_size 3200 --validation_size 1000 \
      --test_size 2000 --num_tracked 128 --window_first_epoch 2 --commit
  python -m experiments.regime lenet5-report --target 0.85
"""

SETTINGS = dict(seeds=5, epochs=3, decay_epochs=1, decay=0.1,
                train_size=3200, validation_size=1000, test_size=2000,
                batch_size=128, a=0.6, model="lenet5")
BLEND = "lookahead"
TARGET = 0.85
