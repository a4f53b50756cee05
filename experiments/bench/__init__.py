"""Benchmarks of the optimizer update cost and memory (not tests).

* :mod:`experiments.bench.update_cost`: time of one jitted ``update`` +
  ``apply_updates`` per method, as a ratio to ``optax.adam`` measured in the
  same process, with the bytes moved per parameter against the machine's
  measured memory bandwidth.
* :mod:`experiments.bench.memory`: optimizer-state bytes per parameter and
  the peak memory of a compiled train step per method, against Adam.
* :mod:`experiments.bench.common`: parameter trees of benchmark size,
  interleaved timing and a memory-bandwidth probe.
"""
