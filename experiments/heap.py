"""Keep freed memory in the process (glibc), so steps do not page-fault.

XLA:CPU allocates a compiled step's temporaries on every call and frees them
at its end. With glibc's defaults a block of tens of megabytes goes back to
the operating system when freed (``mmap``/``munmap``, per-thread arenas that
shrink, a trimmed heap), and the next call faults every page in again, each
zeroed by the kernel. BLAQ's active step (the trial point, its gradient and
blended curvature are temporaries) and the diagnostics (the last latent
weights and codes) pay this on every step: on the MNIST MLP's update
(10M parameters) about 20,000-28,000 page faults per step and 9-27% of the
update's time (``experiments/bench/README.md``, "Freed memory kept"). LAQ's
and Adam's updates, whose state is updated in place, have no large
temporaries and do not change.

:func:`retain_freed_memory` sets three ``mallopt`` parameters: one arena
for all threads, no ``mmap`` for large blocks, and no trimming of the heap
below 2 GiB, so freed blocks are reused by the next call. The heap then
stays at its peak size and fragments before it settles: the peak resident
set grows by 10-25% on the MNIST MLP's update (``python -m
experiments.bench.freed_memory``). The training application calls it when
:mod:`experiments` is imported, before XLA starts its threads;
``BLAQ_JAX_MALLOC=default`` in the environment keeps glibc's defaults. Any
program can get the same without code by starting Python with::

  GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647

Example:
  >>> import os
  >>> from experiments import heap
  >>> os.environ[heap.ENV] = "default"  # keep glibc's defaults
  >>> heap.retain_freed_memory()
  False
  >>> del os.environ[heap.ENV]
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "BLAQ_JAX_MALLOC"
# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


def retain_freed_memory() -> bool:
  """Tells glibc's malloc to keep freed memory for reuse (see module doc).

  Returns True when the settings were applied; False off glibc, or when
  ``BLAQ_JAX_MALLOC=default`` asks for glibc's defaults. Call it before the
  first JAX computation (arenas of running threads are not moved).
  """
  if os.environ.get(ENV, "").strip().lower() == "default":
    return False
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
  except OSError:
    return False
  if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc,
                                                               "mallopt"):
    return False  # not glibc (musl, macOS)
  return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
