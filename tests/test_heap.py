"""experiments.heap: freed memory kept, so a step's temporaries do not fault.

Each case runs in a fresh Python (malloc settings are per process and must
precede XLA's threads): a jitted step with a 64 MiB array, the minor page
faults of 40 calls after 10 warm-up calls counted with ``getrusage``.
"""

import os
import subprocess
import sys

import pytest

CHILD = r"""
import experiments  # applies the settings unless BLAQ_JAX_MALLOC=default
from experiments.bench import common
import jax, jax.numpy as jnp
box = [jnp.ones((4096, 4096))]  # 64 MiB
step = jax.jit(lambda x: x + jnp.sum(jnp.exp(x) * 2.0, axis=0) / x.shape[0],
               donate_argnums=0)

def call():
  box[0] = step(box[0])
  return box[0]

common.page_faults(call, calls=10)  # warm-up
print(common.page_faults(call, calls=40))
"""


def _faults_per_call(env_value):
  env = dict(os.environ)
  env.pop("BLAQ_JAX_MALLOC", None)
  if env_value is not None:
    env["BLAQ_JAX_MALLOC"] = env_value
  out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True,
                       capture_output=True, text=True, timeout=300)
  return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="glibc malloc settings")
def test_kept_memory_removes_the_page_faults_of_each_call():
  default = _faults_per_call("default")
  kept = _faults_per_call(None)
  # A 64 MiB temporary is 16,384 pages of 4 KiB, faulted in on every call
  # with glibc's defaults. Kept, the next call reuses them, except while the
  # heap still grows around fragments (measured: 0-4,100 faults a call
  # averaged over 20 calls, in 21 fresh processes).
  assert default > 4000, default
  assert kept < default / 4, (kept, default)

