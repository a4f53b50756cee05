"""Experiments of blaq_jax: data, models, losses and the training application.

Importing the package keeps freed memory in the process on glibc
(:func:`experiments.heap.retain_freed_memory`; ``BLAQ_JAX_MALLOC=default``
to opt out), before XLA starts its threads.
"""

from experiments import heap as _heap

_heap.retain_freed_memory()
