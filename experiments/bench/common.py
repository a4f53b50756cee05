"""Shared pieces of the benchmarks: parameter trees, timing, bandwidth.

Timing on a shared, noisy machine: every method is a *runner* (a callable
that performs one operation and returns something to block on). The runners
are called in rounds, in an order rotated each round so that slow drift of
the machine's load falls on all of them alike, and each figure is the median
over rounds. Ratios are formed from medians measured in the same run.

The bandwidth probe times a jitted ``a * x + y`` on arrays much larger than
the caches: it moves 12 bytes per element (two reads, one write), and its
GB/s is the practical memory-bound limit an elementwise optimizer update can
reach on this machine.

Example:
  >>> from experiments.bench.common import mlp_params, num_params
  >>> num_params(mlp_params((784, 2048, 2048, 2048, 10)))
  10020874
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from typing import Any, Callable, Dict, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# (in channels, out channels, stride of the first block) of ResNet-18's stages.
_RESNET18_STAGES = ((64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2))


def _bn(c):
  return {"scale": np.ones((c,), np.float32), "bias": np.zeros((c,),
                                                               np.float32)}


def resnet18_shapes(num_classes: int = 1000) -> Dict[str, Any]:
  """Nested dict of ResNet-18 (ImageNet) parameter shapes, Flax-style names.

  Conv kernels are HWIO, named ``kernel`` (so the default selection quantizes
  them and the final dense kernel); BatchNorm ``scale``/``bias`` and the
  dense ``bias`` stay full precision. 11,689,512 parameters for 1000 classes.
  """
  tree = {"conv_init": {"kernel": (7, 7, 3, 64)}, "bn_init": {
      "scale": (64,), "bias": (64,)}}
  for s, (cin, cout, stride) in enumerate(_RESNET18_STAGES):
    for b in range(2):
      c_in = cin if b == 0 else cout
      block = {
          "conv1": {"kernel": (3, 3, c_in, cout)},
          "bn1": {"scale": (cout,), "bias": (cout,)},
          "conv2": {"kernel": (3, 3, cout, cout)},
          "bn2": {"scale": (cout,), "bias": (cout,)},
      }
      if b == 0 and (stride != 1 or c_in != cout):
        block["proj"] = {"kernel": (1, 1, c_in, cout)}
        block["bn_proj"] = {"scale": (cout,), "bias": (cout,)}
      tree[f"stage{s}_block{b}"] = block
  tree["head"] = {"kernel": (512, num_classes), "bias": (num_classes,)}
  return tree


def mlp_shapes(sizes: Sequence[int] = (784, 2048, 2048, 2048, 10)):
  """Shapes of a dense MLP ``sizes[0] -> ... -> sizes[-1]`` (kernel, bias)."""
  return {f"dense{i}": {"kernel": (a, b), "bias": (b,)}
          for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def init_params(shapes, seed: int = 0, dtype=jnp.float32):
  """Arrays for a tree of shapes: He-normal kernels, ones/zeros elsewhere."""
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes,
                                                       is_leaf=_is_shape)
  out = []
  for path, shape in flat:
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      x = rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / fan_in)
    elif name == "scale":
      x = np.ones(shape, np.float32)
    else:
      x = np.zeros(shape, np.float32)
    out.append(jnp.asarray(x, dtype))
  return jax.tree.unflatten(treedef, out)


def resnet18_params(num_classes: int = 1000, seed: int = 0):
  """ResNet-18-shaped parameter arrays (see :func:`resnet18_shapes`)."""
  return init_params(resnet18_shapes(num_classes), seed)


def mlp_params(sizes: Sequence[int] = (784, 2048, 2048, 2048, 10),
               seed: int = 0):
  """MLP parameter arrays (see :func:`mlp_shapes`)."""
  return init_params(mlp_shapes(sizes), seed)


def tiny_params(seed: int = 0):
  """A few-thousand-parameter tree with conv, dense and BN leaves (smoke)."""
  shapes = {"conv": {"kernel": (3, 3, 4, 8)}, "bn": {"scale": (8,),
                                                     "bias": (8,)},
            "head": {"kernel": (8, 10), "bias": (10,)}}
  return init_params(shapes, seed)


PARAM_SETS: Dict[str, Callable[[], Any]] = {
    "resnet18": resnet18_params,
    "mlp": mlp_params,
    "tiny": tiny_params,
}


def num_params(tree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def tree_bytes(tree) -> int:
  """Bytes of all array leaves of a tree (MaskedNode and friends hold none)."""
  return int(sum(np.prod(np.shape(x)) * jnp.result_type(x).itemsize
                 for x in jax.tree.leaves(tree)))


def gradient_like(params, seed: int = 1, scale: float = 1e-3):
  """A random gradient tree with the params' structure."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([
      scale * jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(keys, leaves)])


def block(x):
  return jax.block_until_ready(x)


def time_interleaved(runners: Mapping[str, Callable[[], Any]], *,
                     repeats: int = 20, warmup: int = 2,
                     inner: int = 1) -> Dict[str, list]:
  """Seconds per call of each runner, measured in interleaved rounds.

  Args:
    runners: name -> callable doing one operation (returns what to block on).
    repeats: number of rounds; each round times every runner once.
    warmup: untimed calls of each runner first (compilation, caches).
    inner: calls per timing (their mean is one sample), for very fast ops.

  Returns:
    name -> list of ``repeats`` samples in seconds (take the median).
  """
  names = list(runners)
  for name in names:
    for _ in range(warmup):
      block(runners[name]())
  samples = {name: [] for name in names}
  for r in range(repeats):
    k = r % len(names)
    for name in names[k:] + names[:k]:
      fn = runners[name]
      t0 = time.perf_counter()
      for _ in range(inner):
        out = fn()
      block(out)
      samples[name].append((time.perf_counter() - t0) / inner)
  return samples


def page_faults(fn: Callable[[], Any], calls: int = 5) -> float:
  """Minor page faults per call of ``fn`` (warm: call it before).

  Pages the OS mapped, each zeroed, during the calls: memory a step frees
  and the next allocates again, when the allocator gave it back to the OS
  (:mod:`experiments.heap` keeps it). Counted for the whole process.

  Example:
    >>> import jax.numpy as jnp
    >>> page_faults(lambda: jnp.ones(4)) >= 0
    True
  """
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    block(fn())
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def median(xs) -> float:
  return float(statistics.median(xs))


def ratios(samples: Mapping[str, list], baseline: str) -> Dict[str, float]:
  """Median time of each runner over the baseline's median (same run)."""
  base = median(samples[baseline])
  return {name: median(xs) / base for name, xs in samples.items()}


def bandwidth_probe(num_elements: int = 32 * 2 ** 20, repeats: int = 15
                    ) -> Dict[str, float]:
  """Measured memory bandwidth (GB/s) of jitted ``a y`` and ``a x + y``.

  ``scale`` moves 8 bytes per float32 element (one read, one write),
  ``axpy`` 12 (two reads, one write). The outputs reuse donated input
  buffers, so no allocation is timed. Returns the median GB/s of each
  (1 GB = 1e9 bytes).
  """
  axpy = jax.jit(lambda x, y: 1.0001 * x + y, donate_argnums=(1,))
  scale = jax.jit(lambda y: 0.9999 * y, donate_argnums=(0,))
  box = {"x": jnp.full((num_elements,), 1e-3, jnp.float32),
         "y": jnp.ones((num_elements,), jnp.float32),
         "z": jnp.ones((num_elements,), jnp.float32)}

  def run_axpy():
    box["y"] = axpy(box["x"], box["y"])
    return box["y"]

  def run_scale():
    box["z"] = scale(box["z"])
    return box["z"]

  s = time_interleaved({"axpy": run_axpy, "scale": run_scale},
                       repeats=repeats, warmup=2)
  return {"axpy": 12 * num_elements / median(s["axpy"]) / 1e9,
          "scale": 8 * num_elements / median(s["scale"]) / 1e9}


def machine() -> str:
  """A one-line description of the machine and software."""
  import os  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  dev = jax.devices()[0]
  return (f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on "
          f"{dev.platform} ({dev.device_kind}), "
          f"{time.strftime('%Y-%m-%d')}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]
                   ) -> str:
  """A GitHub markdown table."""
  def cell(x):
    if isinstance(x, float):
      return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
  return "\n".join(lines)
