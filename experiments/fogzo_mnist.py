r"""The FOGZO paper's small experiment: STE vs n-SPSA vs FOGZO on MNIST.

Yang & Aamodt (NeurIPS 2025) train an MLP 784-10-10 with 2-bit weights and the
identity STE on MNIST and compare the training loss of STE, n-SPSA with
``n = 1`` and ``n = d`` (the number of weights, 7960) and FOGZO with ``n = 1``
and ``beta = 0.999``, after the same number of steps and per forward pass.

Here every leaf (kernels and biases, ``d = 7960``) is quantized to 2 bits on
the ``"linear"`` level set ``{-alpha, 0, alpha}`` with the least-squares
scale per tensor, the same Adam for every method and the same minibatches.
FOGZO's ``beta`` decays linearly from 1 to ``beta_min`` over the run.
Cost per step, in passes over the minibatch: STE 1 forward + 1 backward;
n-SPSA ``2n`` forwards (no backward: it gets a zero gradient); FOGZO
``1 + 2n`` forwards + 1 backward. The training loss is measured on a fixed
subset of the training set (``--eval-size``) with the quantized weights.

Usage (the default is a short run, a few minutes on 2 CPU cores)::

  python -m experiments.fogzo_mnist --out fogzo_mnist.md
  python -m experiments.fogzo_mnist --steps 5000 --large-n 7960  # paper's n
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import optax

import blaq_jax

ALL = lambda path, leaf: True  # noqa: E731  quantize every leaf


def init_mlp(key, sizes=(784, 10, 10)):
  """LeCun-normal kernels and zero biases of an MLP."""
  params = {}
  for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {
        "kernel": jax.random.normal(sub, (n_in, n_out)) / np.sqrt(n_in),
        "bias": jnp.zeros(n_out)}
  return params


def logits_fn(params, x):
  n = len(params)
  for i in range(n):
    x = x @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_fn(params, x), y).mean()


def methods(args) -> List[Dict]:
  """Label, transform (a function of the seed), cost per step of each."""
  common = dict(quantizer="uniform", bits=2, level_set="linear",
                surrogate="identity", scale="fit", quantize=ALL)
  big = args.large_n
  batch = min(big, args.directions_batch)
  return [
      dict(label="STE (identity)", n="-", beta="-", grad=True, fwd=1, bwd=1,
           opt=lambda seed: blaq_jax.ste(args.lr, **common)),
      dict(label="n-SPSA", n=1, beta=0, grad=False, fwd=2, bwd=0,
           opt=lambda seed: blaq_jax.n_spsa(args.lr, n=1, seed=seed,
                                            **common)),
      dict(label="n-SPSA", n=big, beta=0, grad=False, fwd=2 * big, bwd=0,
           opt=lambda seed: blaq_jax.n_spsa(args.lr, n=big, seed=seed,
                                            directions_batch=batch,
                                            **common)),
      dict(label="FOGZO", n=1, beta=f"1 -> {args.beta_min}", grad=True,
           fwd=3, bwd=1,
           opt=lambda seed: blaq_jax.fogzo(
               args.lr, n=1, beta_min=args.beta_min,
               beta_decay_steps=args.steps, seed=seed, **common)),
  ]


def batches(n_train, batch_size, steps, seed):
  """The same minibatch index sequence for every method."""
  rng = np.random.default_rng(seed)
  order = np.empty(0, np.int64)
  for _ in range(steps):
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(n_train)])
    idx, order = order[:batch_size], order[batch_size:]
    yield idx


def run_method(m, x, y, x_eval, y_eval, args, seed=None):
  seed = args.seed if seed is None else seed
  opt = m["opt"](seed)
  params = init_mlp(jax.random.key(seed))
  state = opt.init(params)
  params = blaq_jax.quantized_params(params, state)

  @jax.jit
  def step(params, state, xb, yb):
    local = lambda p: loss_fn(p, xb, yb)  # noqa: E731
    grads = (jax.grad(local)(params) if m["grad"]
             else jax.tree.map(jnp.zeros_like, params))
    updates, state = opt.update(grads, state, params, loss_fn=local)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def evaluate(params):
    logits = logits_fn(params, x_eval)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, y_eval).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y_eval)

  curve = [(0, 0, float(evaluate(params)[0]))]
  start = time.perf_counter()
  for t, idx in enumerate(batches(len(x), args.batch_size, args.steps,
                                  seed), start=1):
    params, state = step(params, state, x[idx], y[idx])
    if t % args.eval_every == 0 or t == args.steps:
      loss, _ = evaluate(params)
      curve.append((t, t * m["fwd"], float(loss)))
  seconds = time.perf_counter() - start
  loss, acc = evaluate(params)
  return dict(curve=curve, loss=float(loss), acc=float(acc), seconds=seconds)


def forward_passes_to(curve, target):
  for _, fwd, loss in curve:
    if loss <= target:
      return fwd
  return None


def tail_mean(curve, fraction=0.2):
  """Mean loss over the last ``fraction`` of the evaluations (less noisy)."""
  losses = [loss for _, _, loss in curve[1:]]
  k = max(1, int(round(fraction * len(losses))))
  return float(np.mean(losses[-k:]))


def aggregate(runs):
  """Seed-averaged curve and summary numbers of one method's runs."""
  curve = [(t, fwd, float(np.mean([r["curve"][i][2] for r in runs])))
           for i, (t, fwd, _) in enumerate(runs[0]["curve"])]
  finals = [r["loss"] for r in runs]
  return dict(curve=curve, loss=float(np.mean(finals)),
              loss_std=float(np.std(finals)),
              tail=float(np.mean([tail_mean(r["curve"]) for r in runs])),
              acc=float(np.mean([r["acc"] for r in runs])),
              seconds=float(np.mean([r["seconds"] for r in runs])))


def table(results, args) -> str:
  target = results[2]["tail"]  # n-SPSA with the large n
  d = sum(x.size for x in jax.tree.leaves(init_mlp(jax.random.key(0))))
  lines = [
      f"MNIST, MLP 784-10-10, all {d} weights and biases at 2 bits "
      "({-a, 0, a}, least-squares scale per tensor), identity STE; "
      f"{args.steps} steps, batch {args.batch_size}, Adam lr {args.lr}; "
      f"mean over seeds {args.seed}..{args.seed + args.seeds - 1}. Training "
      f"loss on {args.eval_size} training images with the quantized weights, "
      f"evaluated every {args.eval_every} steps. 'last 20%': mean loss over "
      "the last 20% of the evaluations. Target = n-SPSA "
      f"(n = {args.large_n}) 'last 20%' loss, {target:.4f}.",
      "",
      "| method | n | beta | fwd / step | bwd / step | final loss (+- std) "
      "| last 20% loss | train acc | fwd passes (total) "
      "| fwd passes to target | time / run (s) |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    reach = forward_passes_to(r["curve"], target)
    lines.append(
        f"| {r['label']} | {r['n']} | {r['beta']} | {r['fwd']} | {r['bwd']} "
        f"| {r['loss']:.4f} +- {r['loss_std']:.4f} | {r['tail']:.4f} "
        f"| {100 * r['acc']:.2f}% | {args.steps * r['fwd']:,} | "
        f"{'not reached' if reach is None else f'{reach:,}'} | "
        f"{r['seconds']:.1f} |")
  lines.append("")
  lines.append("(Forward passes to target: at the first evaluation of the "
               "seed-averaged curve whose loss is at or below the target; a "
               "backward pass is not counted as a forward.)")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data-dir", default=None,
                 help="folder with mnist/*-ubyte.gz (default: ../shared/data)")
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--lr", type=float, default=0.01)
  p.add_argument("--large-n", type=int, default=256,
                 help="n of the second n-SPSA run (the paper: 7960 = d)")
  p.add_argument("--directions-batch", type=int, default=64,
                 help="directions evaluated together under vmap")
  p.add_argument("--beta-min", type=float, default=0.999)
  p.add_argument("--eval-every", type=int, default=25)
  p.add_argument("--eval-size", type=int, default=10_000)
  p.add_argument("--seed", type=int, default=0, help="first seed")
  p.add_argument("--seeds", type=int, default=3, help="number of seeds")
  p.add_argument("--out", default=None, help="also write the table here (md)")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  from experiments.data import load_mnist  # pylint: disable=g-import-not-at-top
  data = load_mnist(args.data_dir)
  x, y = data["train"]
  x = jnp.asarray(np.asarray(x, np.float32).reshape(len(x), -1))
  y = jnp.asarray(y, jnp.int32)
  x_eval, y_eval = x[:args.eval_size], y[:args.eval_size]
  results = []
  for m in methods(args):
    runs = [run_method(m, x, y, x_eval, y_eval, args, seed)
            for seed in range(args.seed, args.seed + args.seeds)]
    r = aggregate(runs)
    r.update({k: m[k] for k in ("label", "n", "beta", "fwd", "bwd")})
    print(f"{m['label']:>15} n={m['n']!s:>5}: final loss "
          f"{[round(x['loss'], 4) for x in runs]} ({r['seconds']:.1f}s/run)",
          file=sys.stderr)
    results.append(r)
  text = table(results, args)
  command = "python -m experiments.fogzo_mnist " + " ".join(
      sys.argv[1:] if argv is None else argv)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(f"# FOGZO small experiment (MNIST, MLP 784-10-10, 2-bit)\n\n"
              f"Command: `{command.strip()}`\n\n{text}\n")
  return results


if __name__ == "__main__":
  main()
