"""Memory of each method: optimizer state per parameter and a step's peak.

For each method the table gives the bytes of its optimizer state per
parameter (all array leaves of ``opt.init(params)``) and the memory of one
jitted training step as XLA compiled it (``compiled.memory_analysis()``):

.. math::

  \\text{peak} = \\text{arguments} + \\text{outputs} - \\text{aliased}
  + \\text{temporaries},

with params and state donated (so their outputs alias their inputs). The
step computes the gradient of a loss, calls ``update`` (with ``grad_fn`` /
``loss_fn`` for the methods that need them) and ``apply_updates``. For the
MLP the loss is the cross-entropy of the MLP on a random batch; for the
ResNet-18-shaped tree (no model) it is a quadratic ``sum 0.5 (p - c)^2``, so
the figures there are the optimizer's share of a step. The memory of
``update`` + ``apply_updates`` alone is also reported.

Usage::

  python -m experiments.bench.memory --params both --bits 1,2

Example:
  >>> from experiments.bench.memory import main
  >>> rows = main(["--params", "tiny", "--bits", "1",
  ...              "--methods", "adam,laq"])  # doctest: +ELLIPSIS
  machine: ...
  >>> [r["method"] for r in rows]
  ['adam', 'laq']
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from experiments.bench import common
from experiments.bench import update_cost

BATCH = 128


def _loss_fn(params_name: str, params):
  """A scalar loss of the params (the MLP's cross-entropy, or a quadratic)."""
  if params_name == "mlp":
    sizes = [params[f"dense{i}"]["kernel"].shape for i in range(len(params))]
    x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, sizes[0][0]))
    y = jax.random.randint(jax.random.PRNGKey(1), (BATCH,), 0, sizes[-1][1])

    def loss(p):
      h = x
      for i in range(len(p)):
        h = h @ p[f"dense{i}"]["kernel"] + p[f"dense{i}"]["bias"]
        if i < len(p) - 1:
          h = jax.nn.relu(h)
      return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()
    return loss

  def loss(p):
    return sum(0.5 * jnp.sum((x - 0.01) ** 2) for x in jax.tree.leaves(p))
  return loss


def _peak(compiled) -> Dict[str, int]:
  m = compiled.memory_analysis()
  args, out = m.argument_size_in_bytes, m.output_size_in_bytes
  alias, temp = m.alias_size_in_bytes, m.temp_size_in_bytes
  return dict(args=args, out=out, alias=alias, temp=temp,
              peak=args + out - alias + temp)


def measure(params_name: str, bits_list: Sequence[int], *,
            methods: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  """Rows of the table for one parameter set."""
  params = common.PARAM_SETS[params_name]()
  n = common.num_params(params)
  loss = _loss_fn(params_name, params)
  grads = jax.tree.map(jnp.zeros_like, params)
  rows, adam_done = [], False
  for bits in bits_list:
    for name, (factory, kind) in update_cost.method_specs(bits).items():
      if methods is not None and name not in methods:
        continue
      if name == "adam":
        if adam_done:
          continue
        adam_done = True
      opt = factory()
      state = opt.init(params)
      extra = {}
      if kind in ("grad_fn", "grad_fn_unused"):
        extra["grad_fn"] = jax.grad(loss)
      elif kind == "loss_fn":
        extra["loss_fn"] = loss

      def train_step(params, state, opt=opt, extra=extra):
        g = jax.grad(loss)(params)
        updates, state = opt.update(g, state, params, **extra)
        return optax.apply_updates(params, updates), state

      def update_only(params, state, g, opt=opt, extra=extra):
        updates, state = opt.update(g, state, params, **extra)
        return optax.apply_updates(params, updates), state

      step = _peak(jax.jit(train_step, donate_argnums=(0, 1)).lower(
          params, state).compile())
      upd = _peak(jax.jit(update_only, donate_argnums=(0, 1)).lower(
          params, state, grads).compile())
      rows.append(dict(params=params_name, method=name,
                       bits="-" if name == "adam" else bits,
                       state_bytes=common.tree_bytes(state),
                       state_per_param=common.tree_bytes(state) / n,
                       step_peak=step["peak"], step_temp=step["temp"],
                       update_peak=upd["peak"], update_temp=upd["temp"]))
  base = next((r for r in rows if r["method"] == "adam"), rows[0])
  for r in rows:
    r["state_ratio"] = r["state_bytes"] / max(base["state_bytes"], 1)
    r["step_ratio"] = r["step_peak"] / base["step_peak"]
  return rows


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--params", default="both",
                 choices=["resnet18", "mlp", "both", "tiny"])
  p.add_argument("--bits", default="1,2")
  p.add_argument("--methods", default=None)
  args = p.parse_args(argv)
  bits_list = [int(b) for b in args.bits.split(",") if b]
  names = ["resnet18", "mlp"] if args.params == "both" else [args.params]
  methods = args.methods.split(",") if args.methods else None
  print(f"machine: {common.machine()}")
  mib = 2.0 ** 20
  rows = []
  for name in names:
    r = measure(name, bits_list, methods=methods)
    n = common.num_params(common.PARAM_SETS[name]())
    print(f"\n{name}: {n:,} params (MiB = 2^20 bytes)")
    print(common.markdown_table(
        ["method", "bits", "state B/param", "state x adam",
         "step peak MiB", "step x adam", "step temp MiB",
         "update peak MiB", "update temp MiB"],
        [[x["method"], x["bits"], x["state_per_param"], x["state_ratio"],
          x["step_peak"] / mib, x["step_ratio"], x["step_temp"] / mib,
          x["update_peak"] / mib, x["update_temp"] / mib] for x in r]))
    rows += r
  return rows


if __name__ == "__main__":
  main()
