"""Input pipeline of the training application: splits, loaders, sharding.

The splits come from :func:`experiments.data.get_dataset` (MNIST originals,
TFDS or synthetic data), cut to the config's sizes. Training batches come
from a grain loader (:func:`experiments.data.make_loader`), one shard per
process; :func:`global_batch` assembles each process's shard into arrays
sharded along the ``"data"`` axis of the mesh (:func:`make_mesh`).
Evaluation batches (:func:`eval_batches`) pad the last batch and carry a
``mask`` so that every example counts once.

Example:
  >>> import numpy as np
  >>> from experiments.input_pipeline import eval_batches
  >>> x, y = np.zeros((5, 2, 2, 1)), np.arange(5)
  >>> [b["mask"].tolist() for b in eval_batches(x, y, 4, 0, 1)]
  [[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]
"""

from __future__ import annotations

from typing import Dict, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import data as data_lib


def _subset(xy, n):
  x, y = xy
  return (x[:n], y[:n]) if n and n < len(y) else (x, y)


def load_data(config):
  """The splits (cut to ``config.<split>_size``; 0 keeps all) and the info."""
  options = dict(config.dataset_options.to_dict()) if hasattr(
      config.dataset_options, "to_dict") else dict(config.dataset_options)
  splits, info = data_lib.get_dataset(config.dataset,
                                      config.data_dir or None, **options)
  splits = dict(splits)
  for name, size in (("train", config.train_size),
                     ("validation", config.validation_size),
                     ("test", config.test_size)):
    if size < 0:
      raise ValueError(f"--config.{name}_size must be >= 0, got {size}.")
    if name in splits:
      splits[name] = _subset(splits[name], size)
  return splits, info


def augmentation(config, info):
  """The training augmentation: the dataset's, none, or a named one."""
  if config.augment == "default":
    return info.augment
  if config.augment == "none":
    return None
  return config.augment


def eval_batches(x, y, size: int, process_index: int,
                 process_count: int) -> Iterator[Dict[str, np.ndarray]]:
  """This process's part of the padded evaluation batches of a split.

  Every global batch has ``size`` examples; the last one repeats the last
  example and masks the padding out (``mask`` 0).
  """
  per_proc = size // process_count
  lo, hi = process_index * per_proc, (process_index + 1) * per_proc
  for start in range(0, len(y), size):
    idx = np.arange(start, start + size)
    mask = (idx < len(y)).astype(np.float32)
    idx = np.minimum(idx, len(y) - 1)[lo:hi]
    yield {"image": np.asarray(x[idx], np.float32),
           "label": np.asarray(y[idx], np.int32), "mask": mask[lo:hi]}


def make_mesh(config) -> jax.sharding.Mesh:
  """The 1-D ``"data"`` mesh; checks the batch sizes divide over it."""
  devices = jax.devices()
  if config.num_devices:
    if jax.process_count() > 1:
      raise ValueError("--config.num_devices must be 0 (all devices) in a "
                       "multi-process run.")
    if not 0 < config.num_devices <= len(devices):
      raise ValueError(f"--config.num_devices={config.num_devices}, but "
                       f"{len(devices)} devices are available.")
    devices = devices[:config.num_devices]
  n = len(devices)
  if config.batch_size % n:
    raise ValueError(
        f"--config.batch_size={config.batch_size} is not divisible by the {n} "
        f"devices of the data-parallel mesh; choose a batch size that is a "
        f"multiple of {n} (or set --config.num_devices).")
  if config.batch_size % jax.process_count():
    raise ValueError(f"--config.batch_size={config.batch_size} is not "
                     f"divisible by the {jax.process_count()} processes.")
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def global_batch(mesh, local: Mapping[str, np.ndarray]):
  """A process-local batch as global arrays sharded on ``"data"``."""
  if "data" not in mesh.axis_names:
    raise ValueError(
        f"The mesh has axes {tuple(mesh.axis_names)} but no 'data' axis to "
        "shard the batch over; build it with the data-parallel axis named "
        "'data' (see make_mesh).")
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
