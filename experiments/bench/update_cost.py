"""Time of one jitted optimizer update, as a ratio to ``optax.adam``'s.

Each method's step is ``update`` + ``optax.apply_updates`` in one jitted
function whose params and optimizer state are donated (updated in place, as
in a training loop); the gradient is a fixed random tree. BLAQ's active step
gets ``grad_fn = lambda p: g2`` with a precomputed second gradient ``g2``,
and FOGZO a ``loss_fn`` reading one small leaf, so the trial gradient and
the forward passes are excluded: what is timed is the optimizer's own work.
The methods run in interleaved rounds (see
:func:`experiments.bench.common.time_interleaved`) and the table reports
medians and ratios from the same run.

*bytes/param* is the traffic of a single pass: every byte of the step's
inputs (params, gradients, state) read once and every byte of its outputs
written once, per parameter. *GB/s* is that traffic over the median time,
and *% of bw* compares it with the measured bandwidth of a jitted
``a x + y`` on large arrays, i.e. how close the step is to the memory-bound
limit of one fused pass. *kernels* and *temp B/param* come from the
compiled step (:func:`compiled_profile`): how many passes XLA makes and how
many bytes per parameter of intermediates it writes between them, which is
where a step slower than its one-pass traffic loses its time.

Usage::

  python -m experiments.bench.update_cost --params both --bits 1,2

Example:
  >>> import contextlib, io
  >>> from experiments.bench.update_cost import main
  >>> with contextlib.redirect_stdout(io.StringIO()):  # the printed table
  ...   rows = main(["--params", "tiny", "--bits", "1", "--repeats", "2",
  ...                "--methods", "adam,laq", "--no-bandwidth"])
  >>> [r["method"] for r in rows]
  ['adam', 'laq']
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

import blaq_jax
from experiments.bench import common

LR = 1e-3
# A boolean schedule that is false on every step a benchmark reaches, traced
# (so BLAQ compiles both branches and selects LAQ's with lax.cond).
INACTIVE = blaq_jax.every_n_steps(2 ** 30, offset=2 ** 29)


def _quant_kwargs(bits: int) -> Dict[str, Any]:
  """STE-family quantizer at ``bits``: sign, or the BLAQ level set."""
  if bits == 1:
    return dict(quantizer="sign")
  return dict(quantizer="uniform", bits=bits, level_set="blaq")


def method_specs(bits: int) -> Dict[str, Callable[[], Any]]:
  """name -> (transform factory, kind of extra arguments) at ``bits``.

  Kinds: ``"none"``, ``"grad_fn"`` (trial gradient = the second gradient
  tree), ``"grad_fn_unused"`` (the same, on steps that do not call it, so
  its bytes are not counted), ``"loss_fn"`` (a cheap loss of one small
  leaf).
  """
  specs = {
      "adam": (lambda: optax.adam(LR), "none"),
      "laq": (lambda: blaq_jax.laq(LR, bits=bits), "none"),
      "laq (no diag)": (lambda: blaq_jax.laq(LR, bits=bits,
                                             diagnostics=False), "none"),
      "blaq inactive": (lambda: blaq_jax.blaq(LR, bits=bits,
                                              active=INACTIVE), "grad_fn_unused"),
      "blaq active": (lambda: blaq_jax.blaq(LR, bits=bits), "grad_fn"),
      "blaq active (no diag)": (lambda: blaq_jax.blaq(
          LR, bits=bits, diagnostics=False), "grad_fn"),
  }
  registry = getattr(blaq_jax, "methods", None)
  registry = getattr(registry, "METHODS", {})
  if "ste" in registry:
    specs["ste"] = (lambda: registry["ste"](LR, **_quant_kwargs(bits)),
                    "none")
  if "fogzo" in registry:
    specs["fogzo"] = (lambda: registry["fogzo"](LR, **_quant_kwargs(bits)),
                      "loss_fn")
  return specs


def _smallest_leaf_loss(params):
  leaves = jax.tree.leaves(params)
  k = min(range(len(leaves)), key=lambda i: leaves[i].size)

  def loss(p):
    return jnp.sum(jax.tree.leaves(p)[k]).astype(jnp.float32)
  return loss


def make_runner(opt, kind: str, params, grads, grads2):
  """A runner doing one donated ``update + apply_updates``, and its traffic.

  Returns ``(runner, bytes_moved)`` where ``bytes_moved`` counts each input
  byte read once and each output byte written once.
  """
  loss = _smallest_leaf_loss(params)

  def step(params, state, grads, grads2):
    extra = {}
    if kind in ("grad_fn", "grad_fn_unused"):
      extra["grad_fn"] = lambda p: grads2
    elif kind == "loss_fn":
      extra["loss_fn"] = loss
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  fn = jax.jit(step, donate_argnums=(0, 1))
  box = {"params": jax.tree.map(jnp.copy, params)}
  box["state"] = opt.init(box["params"])
  reads = (common.tree_bytes(box["params"]) + common.tree_bytes(box["state"])
           + common.tree_bytes(grads)
           + (common.tree_bytes(grads2) if kind == "grad_fn" else 0))
  out_shapes = jax.eval_shape(step, box["params"], box["state"], grads,
                              grads2)
  writes = common.tree_bytes(out_shapes)

  def runner():
    box["params"], box["state"] = fn(box["params"], box["state"], grads,
                                     grads2)
    return box["params"]

  compiled = fn.lower(box["params"], box["state"], grads, grads2).compile()
  return runner, reads + writes, compiled_profile(compiled)


def compiled_profile(compiled) -> Dict[str, float]:
  """Why a step is slower than one pass: kernels and temporaries.

  ``kernels``: fusions (and other kernels) XLA runs in the step's entry
  computation, each a pass over its operands; ``temp_bytes``: the scratch
  memory XLA allocates for intermediates written out between them.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = jax.jit(lambda x: jnp.sin(x) * 2).lower(jnp.ones(8)).compile()
    >>> compiled_profile(c)["kernels"] >= 1
    True
  """
  text = compiled.as_text()
  entry = text[text.index("ENTRY"):]
  kernels = sum(1 for line in entry.splitlines()
                if re.search(r"= \S+ (fusion|custom-call|reduce|sort)\(",
                             line))
  mem = compiled.memory_analysis()
  temp = float(getattr(mem, "temp_size_in_bytes", 0)) if mem else 0.0
  return dict(kernels=kernels, temp_bytes=temp)


def measure(params_name: str, bits_list: Sequence[int], *, repeats: int,
            methods: Optional[Sequence[str]] = None,
            bandwidth: Optional[float] = None) -> List[Dict[str, Any]]:
  """Rows of the table for one parameter set (all bit widths together)."""
  params = common.PARAM_SETS[params_name]()
  grads = common.gradient_like(params, seed=1)
  grads2 = common.gradient_like(params, seed=2)
  n = common.num_params(params)
  runners, traffic, labels, profile = {}, {}, {}, {}
  adam_done = False
  for bits in bits_list:
    for name, (factory, kind) in method_specs(bits).items():
      if methods is not None and name not in methods:
        continue
      if name == "adam":
        if adam_done:
          continue
        adam_done = True
      key = name if name == "adam" else f"{name} @{bits}"
      runners[key], traffic[key], profile[key] = make_runner(
          factory(), kind, params, grads, grads2)
      labels[key] = (name, "-" if name == "adam" else bits)
  samples = common.time_interleaved(runners, repeats=repeats, warmup=3)
  base = "adam" if "adam" in samples else next(iter(samples))
  ratio = common.ratios(samples, base)
  rows = []
  for key in runners:
    t = common.median(samples[key])
    gbs = traffic[key] / t / 1e9
    rows.append(dict(
        params=params_name, method=labels[key][0], bits=labels[key][1],
        ms=t * 1e3, ratio=ratio[key], bytes_per_param=traffic[key] / n,
        gbs=gbs, frac_bw=(gbs / bandwidth if bandwidth else float("nan")),
        kernels=profile[key]["kernels"],
        temp_per_param=profile[key]["temp_bytes"] / n))
  return rows


def _parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--params", default="both",
                 choices=["resnet18", "mlp", "both", "tiny"])
  p.add_argument("--bits", default="1,2",
                 help="comma-separated bit widths, e.g. 1,2")
  p.add_argument("--repeats", type=int, default=20,
                 help="interleaved rounds (median over them)")
  p.add_argument("--methods", default=None,
                 help="comma-separated subset of the method names")
  p.add_argument("--no-bandwidth", action="store_true",
                 help="skip the memory-bandwidth probe")
  return p


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  args = _parser().parse_args(argv)
  bits_list = [int(b) for b in args.bits.split(",") if b]
  names = ["resnet18", "mlp"] if args.params == "both" else [args.params]
  methods = args.methods.split(",") if args.methods else None
  bw = None
  if not args.no_bandwidth:
    probe = common.bandwidth_probe(
        num_elements=2 ** 16 if args.params == "tiny" else 32 * 2 ** 20)
    bw = probe["axpy"]
    print(f"measured bandwidth: axpy {probe['axpy']:.1f} GB/s, "
          f"scale {probe['scale']:.1f} GB/s")
  print(f"machine: {common.machine()}")
  rows = []
  for name in names:
    r = measure(name, bits_list, repeats=args.repeats, methods=methods,
                bandwidth=bw)
    n = common.num_params(common.PARAM_SETS[name]())
    print(f"\n{name}: {n:,} params, median of {args.repeats} interleaved "
          "rounds")
    print(common.markdown_table(
        ["method", "bits", "ms", "x adam", "bytes/param", "GB/s",
         "% of bw", "kernels", "temp B/param"],
        [[x["method"], x["bits"], x["ms"], x["ratio"], x["bytes_per_param"],
          x["gbs"], 100 * x["frac_bw"], x["kernels"], x["temp_per_param"]]
         for x in r]))
    rows += r
  sys.stdout.flush()
  return rows


if __name__ == "__main__":
  main()
