"""Every field of a training configuration, with the MNIST MLP's values.

The per-table configurations start from :func:`get_config` and change what
their table changes. Fields under "Run control" only affect logging and
where the run stops; a checkpoint written under other values of them is
still resumed. Every other field must match to resume (see
:data:`experiments.checkpointing.RUN_CONTROL_FIELDS`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The defaults: 1-bit BLAQ on the paper's MNIST MLP (Table 2)."""
  c = ml_collections.ConfigDict()

  # Data. Sizes 0 keep the whole split; else the first n examples.
  c.dataset = "mnist"
  c.data_dir = ""  # "": $BLAQ_DATA_DIR or shared/data beside the checkout.
  c.dataset_options = ml_collections.ConfigDict()  # get_dataset(**options)
  c.train_size = 0
  c.validation_size = 0
  c.test_size = 0
  c.augment = "default"  # "default" (the dataset's), "none", "cifar", ...

  # Model and loss.
  c.model = "mlp"
  c.model_options = ml_collections.ConfigDict({"hidden": (2048, 2048, 2048)})
  c.loss = "squared_hinge"

  # Method (blaq_jax.methods) and its hyper-parameters.
  c.method = "blaq"
  c.bits = 1
  c.level_set = ""  # "": the method's default
  c.per_channel = False  # one scale per output channel instead of per tensor
  c.clip_latent = 0.0  # 0: no clipping of the latent weights
  # The optimizer's zig-zag diagnostics (flip fraction, update cosine, trial
  # statistics): logged per step; False runs the library's cheaper default.
  c.diagnostics = True
  c.edge_bits = 8  # resnet18: first and last layer
  c.a = 0.6  # BLAQ's blend weight
  c.blaq_period_epochs = 5  # BLAQ's m: two-stage update one epoch in m
  # Active epochs are those with epoch % m == offset (0: epochs 1, 1 + m, ...,
  # which are the first epochs after each decay of the MNIST schedule).
  c.blaq_epoch_offset = 0
  c.moments = "real"  # BLAQ: moments inherited from the real gradient
  c.blend = "lookahead"  # BLAQ: reading of Algorithm 1 (lookahead/moments/gradients)
  c.fogzo = ml_collections.ConfigDict(
      {"n": 1, "beta_min": 0.999, "eps_scale": 1.0})

  # Optimisation: Adam; lr * decay_rate ** (epoch // decay_every_epochs).
  c.learning_rate = 0.005
  c.lr_decay_rate = 0.1
  c.lr_decay_every_epochs = 5
  c.batch_size = 100  # global batch, over all devices and processes
  c.num_epochs = 50
  c.seed = 0
  c.num_devices = 0  # 0: all devices (data parallel); n: the first n

  # Run control (not part of the run's identity).
  c.eval_batch_size = 1000
  c.log_every_steps = 10
  c.progress_bar = True
  c.write_plots = True
  c.tensorboard = True
  c.stop_after_epochs = 0  # > 0: stop (as if interrupted) after this epoch
  c.keep_checkpoints = 2
  c.num_tracked = 32  # latent weights traced for the zig-zag statistics
  return c
