r"""Where does BLAQ beat LAQ? A sweep on toys and a linear softmax model.

``python -m experiments.toy_sweep --out experiments/results/toy`` runs the
library's own transforms, :func:`blaq_jax.laq` and
:func:`blaq_jax.blaq` ``(..., blend=reading, grad_fn=...)`` in each of the
three readings of Algorithm 1 (``moments``, ``lookahead``, ``gradients``;
``../shared/METHOD.md``), BLAQ active on every step (``m = 1``), on

* ``fig1``: the loss of the paper's Fig. 1,
  :math:`5 (w_1 - 0.054)^2 + (w_2 + 0.055)^2`, from ``(-0.05, 0.06)``;
* ``abs32``: :math:`\sum_i c_i |w_i|^{3/2}` with ``c = (5, 1)`` from
  ``(-0.05, 0.06)``, where the Newton step overshoots (for one weight, LAQ
  with the exact curvature oscillates between ``q_0`` and ``-q_0``); its
  infimum over the level set is 0 (scale ``alpha -> 0``);
* ``quad10``, ``quad1000``: :math:`\tfrac12 \sum_i h_i (w_i - t_i)^2` over 8
  weights, ``h`` log-spaced from 1 to the condition number 10 or 1000,
  targets ``t`` and start drawn once from ``U(-1, 1)`` (numpy seed 0);
* ``mnist``, ``fashion_mnist``: a linear softmax model (784 -> 10, the kernel
  quantized, the bias in full precision), trained with cross-entropy on the
  first 10,000 training images, batch 100, 300 steps, 3 seeds (seed: the
  initialisation ``N(0, 0.01^2)`` and the data order, shared by all methods:
  paired runs).

**Step size.** On the toys the curvature is fixed, not Adam's: the
transforms get ``curvature_fn(q) = H(q) / s`` (the exact diagonal Hessian at
the point where the gradient is taken, divided by the multiplier ``s``), so
the latent step is ``s m_hat / H``: with ``b1 = 0`` the LAQ step is ``s``
times the Newton step of the analysis (``s = 1``: ``eta = eta_Newton``,
LAQ's exact Newton step; Theorem 2's ``eta > 2 / (L (1 + a))`` reads
``s > 2 / (1 + a)``). Adam's own ``D = (eps + sqrt(v_hat)) / eta`` is not
used there: with a deterministic gradient ``sqrt(v_hat)`` is about ``|g|``,
not the curvature, so the step would be a sign step whose size does not
relate to ``eta_Newton``. ``b1 in {0, 0.9}`` sets the first moment (with
``b1 = 0.9`` the step is a bias-corrected heavy-ball step ``s m_hat / H``;
with ``b1 = 0`` the three readings coincide). On the softmax model ``D`` is
Adam's and the grid is the learning rate, ``eta = s * 0.005`` (0.005: the
paper's MNIST rate).

Grid: ``s`` in 0.5, 0.75, ..., 3 (softmax: 0.5, 1, 2, 3); ``a`` in
{0.3, 0.6, 0.9} (BLAQ only); ``b1`` in {0, 0.9}; 1 and 2 bits (level set
``{-1, -1/2, 1/2, 1}`` times ``alpha`` at 2 bits); LAQ and the three
readings (softmax with ``b1 = 0``: ``moments`` only, the three coincide;
the toys run all three there, a check that they do).

**Measures** per run (one JSON line each in ``OUT/runs_<problem>.jsonl``):

* toys: ``steps_to_tol``, the first step ``t`` at which the loss at the
  quantized point is within ``tol`` (default 1e-3) of the best level-set
  point's, relative to the starting gap:
  :math:`(f(q_t) - f^\star) \le tol\, (f(q_0) - f^\star)`, and
  ``steps_to_stay``, the first step from which it stays within until the
  end (``None``: it is outside at the end; the headline uses this one: a
  quantized iterate can pass near the best point by chance), where
  :math:`f^\star = \min_{\alpha \ge 0, \beta \in Q^n} f(\alpha \beta)` is
  found by brute force over every code ``beta`` (closed form in ``alpha``
  for the quadratics, golden-section search otherwise); ``None`` if never;
  ``in_tol_after``: the fraction of the later steps that stay within;
  ``final_rel_gap`` and ``late_rel_gap`` (mean over the second half of the
  run) of the relative gap; ``turning_points``: sign changes of the latent
  increments per weight (zig-zag); ``flips``: changes of the quantized value
  per weight; ``diverged``: a non-finite value or a final gap above 10 times
  the starting one;
* softmax: ``steps_to_target``, the first evaluation step (every 10 steps)
  whose validation accuracy (first 5,000 validation images) reaches the
  target fixed here before any run, 0.85 for MNIST and 0.75 for
  Fashion-MNIST (``None``: not reached; full-precision linear models reach
  about 0.92 and 0.84); the test accuracy at the best validation step;
  ``final_train_loss`` and ``gap_to_fp``, its excess over a full-precision
  Adam run of 5x the steps (``OUT/reference_<dataset>.json``); turning
  points and flips of 32 fixed kernel entries; ``diverged``.

The sweep is resumable: a cell ``(problem, bits, b1, method)`` whose runs are
all in the JSONL file is skipped. ``OUT/summary.md`` is rewritten from the
JSONL files after every cell (``--summary_only`` rewrites it alone).

Example (a 2-cell grid):
  >>> import tempfile
  >>> from experiments import toy_sweep
  >>> out = tempfile.mkdtemp()
  >>> rows = toy_sweep.run_sweep(out, problems=["fig1"], methods=["laq"],
  ...                            multipliers=[1.0, 2.5], b1s=[0.0],
  ...                            bits=[1], steps=30, quiet=True)
  >>> [(r["multiplier"], r["steps_to_tol"]) for r in rows]
  [(1.0, 1), (2.5, None)]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import pathlib
import shlex
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

TOYS = ("fig1", "abs32", "quad10", "quad1000")
SOFTMAX = ("mnist", "fashion_mnist")
PROBLEMS = TOYS + SOFTMAX
METHODS = ("laq", "moments", "lookahead", "gradients")
READINGS = METHODS[1:]
MULTIPLIERS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0)
A_VALUES = (0.3, 0.6, 0.9)
B1_VALUES = (0.0, 0.9)
BITS = (1, 2)
SEEDS = (0, 1, 2)
LR_MULTIPLIERS = (0.5, 1.0, 2.0, 3.0)  # softmax: one compiled run each

# Softmax model: fixed before any run of this sweep (see the module doc).
BASE_LR = 0.005
TARGETS = {"mnist": 0.85, "fashion_mnist": 0.75}
TRAIN_SIZE, VALIDATION_SIZE, BATCH = 10_000, 5_000, 100
EVAL_EVERY = 10
NUM_TRACKED = 32

COMMAND = "python -m experiments.toy_sweep --out experiments/results/toy"


# ------------------------------------------------------------------ toys --

@dataclasses.dataclass(frozen=True)
class Toy:
  """A deterministic loss on one quantized tensor of ``n`` weights."""
  name: str
  loss: Callable  # jnp (n,) -> scalar
  hessian: Callable  # jnp (n,) -> (n,) diagonal
  start: np.ndarray
  quadratic: Optional[tuple] = None  # (h, t): 0.5 sum h (w - t)^2


def _quadratic_toy(name, h, t, start):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  h, t = np.asarray(h, np.float32), np.asarray(t, np.float32)
  hj, tj = jnp.asarray(h), jnp.asarray(t)
  return Toy(name, lambda w: 0.5 * jnp.sum(hj * (w - tj) ** 2),
             lambda w: hj * jnp.ones_like(w), np.asarray(start, np.float32),
             (h, t))


def make_toy(name: str) -> Toy:
  """The toy problem ``name`` (one of :data:`TOYS`)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if name == "fig1":  # 5 (w1 - 0.054)^2 + (w2 + 0.055)^2
    return _quadratic_toy(name, [10.0, 2.0], [0.054, -0.055], [-0.05, 0.06])
  if name == "abs32":
    c = jnp.asarray([5.0, 1.0])

    def hess(w):  # 3/4 c |w|^(-1/2), finite at 0
      return 0.75 * c / jnp.sqrt(jnp.maximum(jnp.abs(w), 1e-12))
    return Toy(name, lambda w: jnp.sum(c * jnp.abs(w) ** 1.5), hess,
               np.asarray([-0.05, 0.06], np.float32))
  if name in ("quad10", "quad1000"):
    kappa = float(name[4:])
    rng = np.random.default_rng(0)
    t = rng.uniform(-1, 1, 8)
    start = rng.uniform(-1, 1, 8)
    return _quadratic_toy(name, np.logspace(0, np.log10(kappa), 8), t, start)
  raise ValueError(f"Unknown toy {name!r}; expected one of {TOYS}.")


def best_level_set_loss(toy: Toy, bits: int) -> float:
  r"""``min over alpha >= 0, beta in Q^n`` of the loss at ``alpha * beta``.

  Every code ``beta`` is enumerated (``|Q|^n`` of them). For a quadratic
  :math:`\alpha^* = \max(0, \sum h \beta t / \sum h \beta^2)`; otherwise the
  loss is convex in ``alpha`` along a code and a golden-section search on
  ``[0, 4 max |w_0|]`` finds it.
  """
  from blaq_jax.levels import LevelSet  # pylint: disable=g-import-not-at-top
  levels = LevelSet("blaq", bits).values.astype(np.float64)
  n = toy.start.size
  codes = np.array(list(itertools.product(levels, repeat=n)))  # [C, n]
  if toy.quadratic is not None:
    h, t = (x.astype(np.float64) for x in toy.quadratic)
    alpha = np.maximum(0.0, (codes * h * t).sum(1) / (codes ** 2 * h).sum(1))
    q = alpha[:, None] * codes
    return float((0.5 * h * (q - t) ** 2).sum(1).min())
  f = _numpy_loss(toy)
  lo = np.zeros(len(codes))
  hi = np.full(len(codes), 4 * float(np.abs(toy.start).max()) + 1e-3)
  r = (np.sqrt(5) - 1) / 2
  for _ in range(100):
    x1, x2 = hi - r * (hi - lo), lo + r * (hi - lo)
    f1 = f(x1[:, None] * codes)
    f2 = f(x2[:, None] * codes)
    left = f1 <= f2
    hi = np.where(left, x2, hi)
    lo = np.where(left, lo, x1)
  alpha = (lo + hi) / 2
  return float(min(f(alpha[:, None] * codes).min(), f(0 * codes).min()))


def _numpy_loss(toy: Toy):
  if toy.name == "abs32":
    c = np.array([5.0, 1.0])
    return lambda q: (c * np.abs(q) ** 1.5).sum(-1)
  h, t = toy.quadratic
  return lambda q: (0.5 * h * (q - t) ** 2).sum(-1)


def _transform(method: str, bits: int, b1: float, a, lr: float = 1.0):
  import blaq_jax  # pylint: disable=g-import-not-at-top
  if method == "laq":
    return blaq_jax.laq(lr, bits=bits, b1=b1)
  # a: a constant schedule, so that one compiled run covers every a.
  return blaq_jax.blaq(lr, bits=bits, b1=b1, a=lambda count: a, blend=method)


def toy_trajectories(toy: Toy, method: str, bits: int, b1: float,
                     multipliers: Sequence[float], a_values: Sequence[float],
                     steps: int):
  """Latent, quantized and code paths ``[S, A, steps + 1, n]`` per ``(s, a)``.

  One jitted function per ``(toy, method, bits, b1)``, vmapped over the
  multipliers ``s`` and the blend weights ``a``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import blaq_jax  # pylint: disable=g-import-not-at-top

  def loss(p):
    return toy.loss(p["kernel"][0])

  grad = jax.grad(loss)

  def run(s, a):
    opt = _transform(method, bits, b1, a)
    params = {"kernel": jnp.asarray(toy.start)[None]}
    state = opt.init(params)
    params = blaq_jax.quantized_params(params, state)

    def curvature(p):
      return {"kernel": toy.hessian(p["kernel"][0])[None] / s}

    def body(carry, _):
      params, state = carry
      updates, state = opt.update(grad(params), state, params, grad_fn=grad,
                                  curvature_fn=curvature)
      params = optax.apply_updates(params, updates)
      return (params, state), (blaq_jax.latent_params(state)["kernel"][0],
                               params["kernel"][0],
                               blaq_jax.codes(state)["kernel"][0])

    first = (jnp.asarray(toy.start), params["kernel"][0],
             blaq_jax.codes(state)["kernel"][0])
    _, paths = jax.lax.scan(body, (params, state), None, length=steps)
    return tuple(jnp.concatenate([x0[None], x]) for x0, x in zip(first, paths))

  fn = jax.jit(jax.vmap(jax.vmap(run, (None, 0)), (0, None)))
  lat, quant, codes = fn(jnp.asarray(multipliers, jnp.float32),
                         jnp.asarray(a_values, jnp.float32))
  return (np.asarray(lat, np.float64), np.asarray(quant, np.float64),
          np.asarray(codes))


def turning_points(latent: np.ndarray) -> float:
  """Mean over weights of the sign changes of the latent increments.

  ``latent``: ``[T, n]``. Zero increments are skipped (a weight at rest
  neither turns nor moves on).

  >>> turning_points(np.array([[0.0], [1.0], [0.0], [0.0], [1.0]]))
  2.0
  """
  d = np.diff(latent, axis=0)
  counts = []
  for k in range(d.shape[1]):
    s = np.sign(d[:, k][np.abs(d[:, k]) > 1e-12])
    counts.append(int(np.sum(s[1:] != s[:-1])))
  return float(np.mean(counts))


def flips(codes: np.ndarray) -> float:
  """Mean over weights of the steps where the code (level) changed.

  >>> flips(np.array([[0, 1], [1, 1], [0, 1]]))
  1.0
  """
  return float((np.diff(np.asarray(codes, np.int64), axis=0) != 0)
               .sum(0).mean())


def toy_measures(f_path: np.ndarray, f_best: float, latent: np.ndarray,
                 codes: np.ndarray, tol: float) -> Dict[str, Any]:
  """The toy measures of one run (see the module doc)."""
  finite = bool(np.all(np.isfinite(latent)) and np.all(np.isfinite(f_path)))
  gap0 = float(f_path[0] - f_best)
  rel = (f_path - f_best) / gap0 if gap0 > 0 else np.zeros_like(f_path)
  inside = np.flatnonzero(rel <= tol) if finite else np.zeros(0, int)
  hit = int(inside[0]) if inside.size else None
  outside = np.flatnonzero(~(rel <= tol)) if finite else np.zeros(0, int)
  stay = (int(outside[-1]) + 1 if outside.size else 0) if finite else None
  out = dict(
      steps_to_tol=hit,
      steps_to_stay=stay if stay is not None and stay < len(rel) else None,
      in_tol_after=(float(np.mean(rel[hit:] <= tol)) if hit is not None
                    else None),
      final_gap=float(f_path[-1] - f_best) if finite else None,
      final_rel_gap=float(rel[-1]) if finite else None,
      late_rel_gap=(float(np.mean(rel[len(rel) // 2:])) if finite
                    else None),
      turning_points=turning_points(latent) if finite else None,
      flips=flips(codes) if finite else None,
      diverged=bool(not finite or rel[-1] > 10))
  return out


def _toy_cell(problem, bits, b1, method, multipliers, a_values, steps, tol):
  toy = make_toy(problem)
  f_best = best_level_set_loss(toy, bits)
  f = _numpy_loss(toy)
  a_grid = list(a_values) if method != "laq" else [1.0]
  lat, quant, codes = toy_trajectories(toy, method, bits, b1, multipliers,
                                       a_grid, steps)
  rows = []
  for i, s in enumerate(multipliers):
    for j, a in enumerate(a_grid):
      m = toy_measures(f(quant[i, j]), f_best, lat[i, j], codes[i, j], tol)
      rows.append(dict(problem=problem, bits=bits, b1=b1, method=method,
                       a=None if method == "laq" else float(a),
                       multiplier=float(s), seed=None, steps=steps, tol=tol,
                       best_loss=f_best, **m))
  return rows


# --------------------------------------------------------------- softmax --

def _softmax_data(name: str, data_dir=None):
  from experiments import data  # pylint: disable=g-import-not-at-top
  splits = data.load_mnist(data_dir, name)
  flat = {k: (x.reshape(len(x), -1), y) for k, (x, y) in splits.items()}
  return dict(train=tuple(v[:TRAIN_SIZE] for v in flat["train"]),
              validation=tuple(v[:VALIDATION_SIZE]
                               for v in flat["validation"]),
              test=flat["test"])


def _seed_inputs(seed: int, steps: int):
  """Initial kernel and the ``[steps, BATCH]`` data order of one seed."""
  rng = np.random.default_rng(seed)
  kernel = (0.01 * rng.standard_normal((784, 10))).astype(np.float32)
  per_epoch = TRAIN_SIZE // BATCH
  order = np.concatenate([rng.permutation(TRAIN_SIZE)
                          for _ in range(-(-steps // per_epoch))])
  return kernel, order[:steps * BATCH].reshape(steps, BATCH).astype(np.int32)


def _xent(params, x, y):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  logits = x @ params["kernel"] + params["bias"]
  return jnp.mean(jax.nn.logsumexp(logits, -1)
                  - jnp.take_along_axis(logits, y[:, None], -1)[:, 0])


def _accuracy(params, x, y):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.mean(jnp.argmax(x @ params["kernel"] + params["bias"], -1) == y)


def softmax_trajectories(splits, method: str, bits: int, b1: float, lr: float,
                         seeds: Sequence[int], a_values: Sequence[float],
                         steps: int, tracked: np.ndarray):
  """Evaluations and tracked latent paths for every ``(seed, a)``.

  Returns numpy arrays ``[N, A, E]`` (train loss, validation and test
  accuracy after every ``EVAL_EVERY`` steps, E = steps / EVAL_EVERY + 1 with
  the start) and ``[N, A, steps + 1, K]`` (tracked latent weights, codes).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import blaq_jax  # pylint: disable=g-import-not-at-top

  xtr, ytr = (jnp.asarray(v) for v in splits["train"])
  xva, yva = (jnp.asarray(v) for v in splits["validation"])
  xte, yte = (jnp.asarray(v) for v in splits["test"])
  idx = jnp.asarray(tracked)

  def evaluate(params):
    return jnp.stack([_xent(params, xtr, ytr), _accuracy(params, xva, yva),
                      _accuracy(params, xte, yte)])

  def run(kernel, order, a):
    opt = _transform(method, bits, b1, a, lr)
    params = {"kernel": kernel, "bias": jnp.zeros(10, jnp.float32)}
    state = opt.init(params)
    params = blaq_jax.quantized_params(params, state)

    def track(state):
      return (blaq_jax.latent_params(state)["kernel"].reshape(-1)[idx],
              blaq_jax.codes(state)["kernel"].reshape(-1)[idx])

    def step(carry, batch_idx):
      params, state = carry
      x, y = xtr[batch_idx], ytr[batch_idx]
      grad = jax.grad(lambda p: _xent(p, x, y))
      updates, state = opt.update(grad(params), state, params, grad_fn=grad)
      params = optax.apply_updates(params, updates)
      return (params, state), track(state)

    def chunk(carry, orders):
      carry, paths = jax.lax.scan(step, carry, orders)
      return carry, (evaluate(carry[0]), paths)

    first = (evaluate(params), track(state))
    _, (evals, (lat, codes)) = jax.lax.scan(
        chunk, (params, state), order.reshape(-1, EVAL_EVERY, BATCH))
    return (jnp.concatenate([first[0][None], evals]),
            jnp.concatenate([first[1][0][None], lat.reshape(-1, idx.size)]),
            jnp.concatenate([first[1][1][None], codes.reshape(-1, idx.size)]))

  inputs = [_seed_inputs(s, steps) for s in seeds]
  kernels = jnp.asarray(np.stack([k for k, _ in inputs]))
  orders = jnp.asarray(np.stack([o for _, o in inputs]))
  fn = jax.jit(jax.vmap(jax.vmap(run, (None, None, 0)), (0, 0, None)))
  evals, lat, codes = fn(kernels, orders, jnp.asarray(a_values, jnp.float32))
  return (np.asarray(evals, np.float64), np.asarray(lat, np.float64),
          np.asarray(codes))


def fp_reference(splits, steps: int) -> float:
  """Training loss of a full-precision Adam run (lr BASE_LR, seed 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  xtr, ytr = (jnp.asarray(v) for v in splits["train"])
  kernel, order = _seed_inputs(0, steps)
  opt = optax.adam(BASE_LR)
  params = {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(10)}

  def step(carry, b):
    params, state = carry
    g = jax.grad(lambda p: _xent(p, xtr[b], ytr[b]))(params)
    updates, state = opt.update(g, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.jit(lambda c, o: jax.lax.scan(step, c, o))(
      (params, opt.init(params)), jnp.asarray(order))
  return float(_xent(params, xtr, ytr))


def _softmax_cell(problem, bits, b1, method, multipliers, a_values, seeds,
                  steps, splits, ref_loss):
  from experiments import stats  # pylint: disable=g-import-not-at-top
  a_grid = list(a_values) if method != "laq" else [1.0]
  tracked = np.random.default_rng(12345).choice(784 * 10, NUM_TRACKED,
                                                replace=False)
  rows = []
  for s in multipliers:
    lr = float(s * BASE_LR)
    evals, lat, codes = softmax_trajectories(splits, method, bits, b1, lr,
                                             seeds, a_grid, steps, tracked)
    for i, seed in enumerate(seeds):
      for j, a in enumerate(a_grid):
        ev = evals[i, j]
        records = [dict(step=EVAL_EVERY * e, train_loss=ev[e, 0],
                        validation_accuracy=ev[e, 1], test_accuracy=ev[e, 2])
                   for e in range(ev.shape[0])]
        finite = bool(np.all(np.isfinite(ev)) and np.all(np.isfinite(lat[i, j])))
        hit = stats.first_reaching(records, TARGETS[problem],
                                   key="validation_accuracy", x="step")
        best = stats.select_by_validation(records, x="step")
        rows.append(dict(
            problem=problem, bits=bits, b1=b1, method=method,
            a=None if method == "laq" else float(a), multiplier=float(s),
            lr=lr, seed=int(seed), steps=steps, target=TARGETS[problem],
            steps_to_target=hit.at if finite else None,
            best_validation_step=best["step"],
            test_accuracy_at_best_validation=float(best["test_accuracy"]),
            final_validation_accuracy=float(ev[-1, 1]),
            final_train_loss=float(ev[-1, 0]) if finite else None,
            gap_to_fp=float(ev[-1, 0] - ref_loss) if finite else None,
            turning_points=turning_points(lat[i, j]) if finite else None,
            flips=flips(codes[i, j]) if finite else None,
            diverged=bool(not finite or ev[-1, 0] > 2 * ev[0, 0])))
  return rows


# ----------------------------------------------------------------- sweep --

def _key(r: Dict[str, Any]):
  return (r["problem"], r["bits"], float(r["b1"]), r["method"],
          None if r["a"] is None else float(r["a"]), float(r["multiplier"]),
          r["seed"])


def read_rows(out: str, problem: str) -> List[Dict[str, Any]]:
  path = pathlib.Path(out) / f"runs_{problem}.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def run_sweep(out: str, *, problems: Sequence[str] = PROBLEMS,
              methods: Sequence[str] = METHODS,
              multipliers: Sequence[float] = MULTIPLIERS,
              lr_multipliers: Sequence[float] = LR_MULTIPLIERS,
              a_values: Sequence[float] = A_VALUES,
              b1s: Sequence[float] = B1_VALUES, bits: Sequence[int] = BITS,
              seeds: Sequence[int] = SEEDS, steps: Optional[int] = None,
              tol: float = 1e-3, data_dir=None, quiet: bool = False,
              command: str = COMMAND, note: str = "") -> List[Dict[str, Any]]:
  """Runs the missing cells, appends their rows, rewrites ``summary.md``.

  Args:
    out: the results directory.
    problems, methods, multipliers, a_values, b1s, bits, seeds: the grid
      (seeds: softmax problems only).
    lr_multipliers: the softmax problems' multipliers of ``BASE_LR``.
    steps: steps per run (default 200 on the toys, 300 on the softmax).
    tol: the toys' relative gap tolerance.
    data_dir: MNIST files (default: :func:`experiments.data.default_data_dir`).
    quiet: no progress lines.
    command: the command recorded in the summary.
    note: a line recorded in the summary (e.g. the library's commit).

  Returns:
    The rows of the requested grid (read back from the JSONL files).
  """
  for name, values, allowed in (("problem", problems, PROBLEMS),
                                ("method", methods, METHODS)):
    bad = [v for v in values if v not in allowed]
    if bad:
      raise ValueError(f"Unknown {name}(s) {bad}; choose from {allowed}.")
  if not tol > 0:
    raise ValueError(f"tol must be positive, got {tol!r}.")
  root = pathlib.Path(out)
  root.mkdir(parents=True, exist_ok=True)
  wanted = []
  for problem in problems:
    toy = problem in TOYS
    n_steps = steps or (200 if toy else 300)
    if not toy and n_steps % EVAL_EVERY:
      raise ValueError(f"steps must be a multiple of {EVAL_EVERY} on the "
                       f"softmax problems, got {n_steps}.")
    done = {_key(r) for r in read_rows(out, problem)}
    splits = ref = None
    mults = multipliers if toy else lr_multipliers
    for b, b1, method in itertools.product(bits, b1s, methods):
      if not toy and b1 == 0 and method in ("lookahead", "gradients"):
        continue  # b1 = 0: the readings coincide (run on the toys)
      a_grid = [None] if method == "laq" else [float(a) for a in a_values]
      cell_seeds = [None] if toy else [int(s) for s in seeds]
      keys = [(problem, b, float(b1), method, a, float(s), seed)
              for s in mults for a in a_grid for seed in cell_seeds]
      wanted += keys
      if all(k in done for k in keys):
        continue
      t0 = time.perf_counter()
      if toy:
        rows = _toy_cell(problem, b, b1, method, multipliers, a_values,
                         n_steps, tol)
      else:
        if splits is None:
          splits = _softmax_data(problem, data_dir)
          ref = _reference(root, problem, splits, n_steps)
        rows = _softmax_cell(problem, b, b1, method, mults, a_values,
                             seeds, n_steps, splits, ref)
      rows = [r for r in rows if _key(r) not in done]
      with open(root / f"runs_{problem}.jsonl", "a") as fh:
        for r in rows:
          fh.write(json.dumps(r) + "\n")
      done |= {_key(r) for r in rows}
      if not quiet:
        print(f"{problem} bits={b} b1={b1} {method}: {len(rows)} runs, "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
      write_summary(out, command, note)
  write_summary(out, command, note)
  wanted = set(wanted)
  return [r for p in problems for r in read_rows(out, p) if _key(r) in wanted]


def _reference(root: pathlib.Path, problem: str, splits, steps: int) -> float:
  path = root / f"reference_{problem}.json"
  if path.exists():
    return json.loads(path.read_text())["train_loss"]
  loss = fp_reference(splits, 5 * steps)
  path.write_text(json.dumps(dict(
      problem=problem, optimizer="optax.adam", learning_rate=BASE_LR,
      steps=5 * steps, seed=0, train_size=TRAIN_SIZE, train_loss=loss)) + "\n")
  return loss


# --------------------------------------------------------------- summary --

def _steps_cell(r):
  if r is None:
    return ""
  if r["diverged"]:
    return "div"
  return "-" if r["steps_to_stay"] is None else str(r["steps_to_stay"])


def _faster(x, y, key="steps_to_stay"):
  """+1 if run x reached its tolerance in fewer steps than y, -1 if more."""
  def val(r):
    if r["diverged"] or r[key] is None:
      return np.inf
    return r[key]
  vx, vy = val(x), val(y)
  return 0 if vx == vy else (1 if vx < vy else -1)


def _toy_sections(rows: List[Dict[str, Any]]) -> List[str]:
  by = {_key(r): r for r in rows}
  problems = [p for p in TOYS if any(r["problem"] == p for r in rows)]
  lines = []
  # Headline: BLAQ against LAQ, per problem and reading, over the grid.
  lines += ["### BLAQ against LAQ on the toys: steps to the tolerance", "",
            "Per problem and reading, over every (multiplier, a, b1, bits) "
            "cell: how often BLAQ got to stay within the tolerance "
            "(`steps_to_stay`) in fewer steps than LAQ at the same "
            "(multiplier, b1, bits) (a run that never stays within or "
            "diverges counts as infinitely slow; both never: a tie); the "
            "same for the first step within the tolerance (`steps_to_tol`); "
            "how often its mean relative gap over the second half of the "
            "run (`late_rel_gap`) was lower; and the multipliers `s` where "
            "BLAQ stays within sooner at `a = 0.6` (1 bit).", "",
            "| problem | reading | faster / slower / tie (stay) "
            "| faster / slower / tie (first) | lower late gap "
            "| 1 bit, b1 = 0, a = 0.6: faster at s "
            "| 1 bit, b1 = 0.9, a = 0.6: faster at s |",
            "|---|---|---|---|---|---|---|"]
  for p in problems:
    for reading in READINGS:
      tally = {1: 0, -1: 0, 0: 0}
      first = {1: 0, -1: 0, 0: 0}
      lower, compared = 0, 0
      wins = {0.0: [], 0.9: []}
      for r in rows:
        if r["problem"] != p or r["method"] != reading:
          continue
        laq = by.get((p, r["bits"], float(r["b1"]), "laq", None,
                      float(r["multiplier"]), None))
        if laq is None:
          continue
        c = _faster(r, laq)
        tally[c] += 1
        first[_faster(r, laq, "steps_to_tol")] += 1
        compared += 1
        lower += bool(not r["diverged"] and (
            laq["diverged"] or r["late_rel_gap"] < laq["late_rel_gap"]))
        if (c == 1 and r["bits"] == 1 and r["a"] == 0.6
            and float(r["b1"]) in wins):
          wins[float(r["b1"])].append(r["multiplier"])
      if sum(tally.values()) == 0:
        continue
      lines.append(
          f"| {p} | {reading} | {tally[1]} / {tally[-1]} / {tally[0]} | "
          f"{first[1]} / {first[-1]} / {first[0]} | {lower}/{compared} | "
          f"{', '.join(f'{s:g}' for s in sorted(wins[0.0])) or 'none'} | "
          f"{', '.join(f'{s:g}' for s in sorted(wins[0.9])) or 'none'} |")
  lines.append("")
  # Per problem tables.
  for p in problems:
    pr = [r for r in rows if r["problem"] == p]
    ex = pr[0]
    lines += [f"### {p}: steps to within {ex['tol']:g} of the best level-set "
              f"point (best loss {ex['best_loss']:.6g} at 1 bit)"
              if ex["bits"] == 1 else f"### {p}", ""]
    for b, b1 in itertools.product(BITS, B1_VALUES):
      sub = [r for r in pr if r["bits"] == b and float(r["b1"]) == b1]
      if not sub:
        continue
      cols = [("laq", None)] + [(m, a) for m in READINGS for a in A_VALUES
                                if any(r["method"] == m and r["a"] == a
                                       for r in sub)]
      mults = sorted({r["multiplier"] for r in sub})
      lines += [f"{b} bit(s), b1 = {b1:g}, {sub[0]['steps']} steps. Cells: "
                "`steps_to_stay (steps_to_tol) / turning points per weight` "
                "(`-`: never, `div`: diverged); **bold**: BLAQ stays within "
                "the tolerance sooner than LAQ.", "",
                "| s | " + " | ".join(
                    "LAQ" if m == "laq" else f"{m[:4]} a={a:g}"
                    for m, a in cols) + " |",
                "|---" * (len(cols) + 1) + "|"]
      for s in mults:
        cells = []
        laq = by.get((p, b, b1, "laq", None, s, None))
        for m, a in cols:
          r = by.get((p, b, b1, m, a, s, None))
          if r is None:
            cells.append("")
            continue
          txt = _steps_cell(r)
          if not r["diverged"]:
            first = r["steps_to_tol"]
            txt += f" ({'-' if first is None else first})"
            txt += f" / {r['turning_points']:.0f}"
          if m != "laq" and laq is not None and _faster(r, laq) == 1:
            txt = f"**{txt}**"
          cells.append(txt)
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
      lines.append("")
  return lines


def _softmax_headline(rows: List[Dict[str, Any]]) -> List[str]:
  """Per dataset, bits and reading: cells where the paired interval tells."""
  from experiments import stats  # pylint: disable=g-import-not-at-top
  by = {}
  for r in rows:
    by.setdefault((r["problem"], r["bits"], float(r["b1"]), r["multiplier"],
                   r["method"], r["a"]), {})[r["seed"]] = r["steps_to_target"]
  lines = ["### BLAQ against LAQ on the linear softmax: steps to the target",
           "", "Per dataset, bits and reading, over the (learning rate, a, "
           "b1) cells: in how many the 95% t-interval of the paired "
           "difference BLAQ - LAQ in steps lies below 0 (BLAQ reliably "
           "faster), above 0 (reliably slower), or contains 0; cells where "
           "a run did not reach the target are counted apart. With b1 = 0 "
           "only `moments` runs (the three readings coincide), so the other "
           "two have b1 = 0.9 cells only.", "",
           "| dataset | bits | reading | faster | slower | cannot tell | "
           "not reached by some run |", "|---|---|---|---|---|---|---|"]
  for p in SOFTMAX:
    for b in BITS:
      for reading in READINGS:
        n = {"faster": 0, "slower": 0, "tie": 0, "miss": 0}
        for key, mine in by.items():
          if key[0] != p or key[1] != b or key[4] != reading:
            continue
          base = by.get(key[:4] + ("laq", None))
          if not base:
            continue
          _, x, y = stats.paired_by_seed(mine, base)
          if len(x) < 2 or None in x + y:
            n["miss"] += 1
            continue
          d = stats.paired_difference(x, y)
          n["faster" if d.high < 0 else "slower" if d.low > 0 else "tie"] += 1
        if sum(n.values()):
          lines.append(f"| {p} | {b} | {reading} | {n['faster']} | "
                       f"{n['slower']} | {n['tie']} | {n['miss']} |")
  return lines + [""]


def _softmax_sections(rows: List[Dict[str, Any]]) -> List[str]:
  from experiments import stats  # pylint: disable=g-import-not-at-top
  lines = _softmax_headline(rows) if rows else []
  for p in SOFTMAX:
    pr = [r for r in rows if r["problem"] == p]
    if not pr:
      continue
    lines += [f"### {p}: linear softmax, validation accuracy target "
              f"{TARGETS[p]:g} (fixed before the runs)", "",
              "Per learning rate: steps to the target, mean ± sample sd over "
              "seeds (n), or how many runs did not reach it; the paired "
              "difference BLAQ - LAQ in steps (same seeds) with its 95% "
              "t-interval when every run of both reached it (negative: BLAQ "
              "faster); test accuracy at the best validation step.", "",
              "| bits | b1 | lr | method | a | steps to target | BLAQ - LAQ "
              "steps [95% CI] | test acc at best val (%) | turning points "
              "| diverged |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    cells = {}
    for r in pr:
      cells.setdefault((r["bits"], float(r["b1"]), r["multiplier"],
                        r["method"], r["a"]), []).append(r)
    for key in sorted(cells, key=lambda k: (k[0], k[1], k[2],
                                            METHODS.index(k[3]), k[4] or 0)):
      b, b1, s, m, a = key
      rs = sorted(cells[key], key=lambda r: r["seed"])
      hits = [stats.Reach(r["steps_to_target"] is not None,
                          r["steps_to_target"], None) for r in rs]
      diff = ""
      laq = cells.get((b, b1, s, "laq", None))
      if m != "laq" and laq:
        mine = {r["seed"]: r["steps_to_target"] for r in rs}
        base = {r["seed"]: r["steps_to_target"] for r in laq}
        seeds_, x, y = stats.paired_by_seed(mine, base)
        if len(seeds_) >= 2 and None not in x + y:
          diff = stats.format_difference(stats.paired_difference(x, y),
                                         digits=1)
        elif seeds_:
          diff = "n/a (not reached)"
      acc = stats.summarize([r["test_accuracy_at_best_validation"]
                             for r in rs])
      tp = stats.summarize([r["turning_points"] for r in rs
                            if r["turning_points"] is not None])
      lines.append(
          f"| {b} | {b1:g} | {rs[0]['lr']:g} | {m} | "
          f"{'' if a is None else f'{a:g}'} | {stats.format_reach(hits)} | "
          f"{diff} | {stats.format_summary(acc, 100)} | "
          f"{stats.format_summary(tp, digits=1)} | "
          f"{sum(r['diverged'] for r in rs)}/{len(rs)} |")
    lines.append("")
  return lines


def write_summary(out: str, command: Optional[str] = COMMAND,
                  note: str = "") -> str:
  """Rewrites ``OUT/summary.md`` from the JSONL files; returns its text.

  ``command`` (``None``: the one the previous summary names, else
  :data:`COMMAND`) and ``note`` (e.g. the library commit; kept from the
  previous summary when not given) are recorded at the top.
  """
  rows = [r for p in PROBLEMS for r in read_rows(out, p)]
  path = pathlib.Path(out) / "summary.md"
  old = path.read_text().splitlines() if path.exists() else []
  if not note:
    notes = [line for line in old if line.startswith("Note: ")]
    note = notes[0][len("Note: "):] if notes else ""
  if command is None:
    written = [line.split("`")[1] for line in old
               if line.startswith("Written by `")]
    command = written[0] if written else COMMAND

  text = "\n".join([
      "# Toy and convex sweep: where BLAQ beats LAQ", "",
      f"Written by `{command}` (module docstring of "
      "`experiments/toy_sweep.py`: problems, step multiplier `s = eta / "
      "eta_Newton`, measures). Raw rows: `runs_<problem>.jsonl` in this "
      f"directory ({len(rows)} runs). Tables rendered from them by "
      f"`python -m experiments.toy_sweep --out {out} --summary_only`.", "",
      *([f"Note: {note}", ""] if note else []),
      *_toy_sections([r for r in rows if r["problem"] in TOYS]),
      *_softmax_sections([r for r in rows if r["problem"] in SOFTMAX])])
  path.write_text(text + "\n")
  return text


def _csv(text, cast):
  return [cast(t) for t in text.split(",") if t.strip()]


def main(argv: Optional[Sequence[str]] = None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="results directory")
  p.add_argument("--problems", default=",".join(PROBLEMS))
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--multipliers", default=",".join(map(str, MULTIPLIERS)))
  p.add_argument("--lr_multipliers",
                 default=",".join(map(str, LR_MULTIPLIERS)))
  p.add_argument("--a", default=",".join(map(str, A_VALUES)))
  p.add_argument("--b1", default=",".join(map(str, B1_VALUES)))
  p.add_argument("--bits", default=",".join(map(str, BITS)))
  p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--tol", type=float, default=1e-3)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--summary_only", action="store_true",
                 help="rewrite summary.md from the JSONL files (keeps the "
                 "command and note it names)")
  p.add_argument("--note", default="",
                 help="a line to record in the summary (e.g. the commit)")
  args = p.parse_args(argv)
  command = "python -m experiments.toy_sweep " + shlex.join(
      sys.argv[1:] if argv is None else argv)
  if args.summary_only:
    print(write_summary(args.out, None, args.note))
    return []
  return run_sweep(
      args.out, problems=_csv(args.problems, str),
      methods=_csv(args.methods, str),
      multipliers=_csv(args.multipliers, float),
      lr_multipliers=_csv(args.lr_multipliers, float), a_values=_csv(args.a, float),
      b1s=_csv(args.b1, float), bits=_csv(args.bits, int),
      seeds=_csv(args.seeds, int), steps=args.steps, tol=args.tol,
      data_dir=args.data_dir, command=command, note=args.note)


if __name__ == "__main__":
  main()
