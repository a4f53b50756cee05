"""Benchmarks of the update cost, train step, scaling and memory (not tests).

* :mod:`experiments.bench.update_cost`: time of one jitted ``update`` +
  ``apply_updates`` per method, as a ratio to ``optax.adam`` measured in the
  same process, with the bytes moved per parameter against the machine's
  measured memory bandwidth.
* :mod:`experiments.bench.memory`: optimizer-state bytes per parameter and
  the peak memory of a compiled train step per method, against Adam.
* :mod:`experiments.bench.train_step`: time of the full jitted training step
  (forward, backward, update) per method and model, as a ratio to Adam's.
* :mod:`experiments.bench.scaling`: weak scaling of data-parallel BLAQ over
  1-8 devices, with the all-reduces and bytes of the compiled step.
* :mod:`experiments.bench.common`: parameter trees of benchmark size,
  interleaved timing and a memory-bandwidth probe.
"""
