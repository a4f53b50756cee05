r"""Zig-zag statistics of quantized training (Table 1 of the BLAQ paper).

The paper tracks a fixed set of latent weights over a window of steps and
reports, per method and bit width,

* **amplitude**: the largest oscillation amplitude of the latent weights,
* **frequency**: how often the quantized weights change value (flip).

Both are computed here from a recorded trace: ``latent[t, k]`` and
``quantized[t, k]``, the latent and the quantized value of tracked weight
``k`` after step ``t``. An *oscillation* of a weight is a swing between two
successive turning points of its latent trajectory (where the step changes
sign); its amplitude is half the swing:

.. math::

  A_k = \max_j \tfrac12 \bigl|w_k(\tau_{j+1}) - w_k(\tau_j)\bigr|, \qquad
  F_k = \#\{t : q_k(t+1) \ne q_k(t)\},

with :math:`\tau_j` the turning points of weight :math:`k` in the window. A
weight drifting in one direction has no turning point and amplitude 0, so a
slow trend is not counted as zig-zag. The table reports the maximum of
:math:`A_k` and the mean of :math:`F_k` over the tracked weights (with their
means and maxima as extra columns).

The per-step signals kept by every blaq_jax transform,
:class:`blaq_jax.Diagnostics` ``flip_fraction`` and ``update_cosine``, are
read from the optimizer state with :func:`step_diagnostics`.

Example:
  >>> import numpy as np
  >>> from experiments.zigzag import table1_stats
  >>> t = np.arange(8)
  >>> latent = np.stack([0.01 * (-1.0) ** t, 0.001 * t], axis=1)
  >>> stats = table1_stats(latent, np.sign(latent))
  >>> round(stats["amplitude"], 6), stats["frequency"]
  (0.01, 4.0)
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import blaq_jax

# The diagnostics fields read from an optimizer state, with their defaults
# for methods without them (full-precision Adam).
DIAGNOSTICS = ("flip_fraction", "update_cosine", "trial_active")


def _check_trace(latent, quantized):
  latent = np.asarray(latent, np.float64)
  quantized = np.asarray(quantized, np.float64)
  if latent.ndim != 2:
    raise ValueError(f"latent trace must be [steps, tracked weights], got "
                     f"shape {latent.shape}.")
  if quantized.shape != latent.shape:
    raise ValueError(f"quantized trace has shape {quantized.shape}, the "
                     f"latent trace {latent.shape}; they must match.")
  return latent, quantized


def oscillation_amplitudes(latent) -> np.ndarray:
  """Per tracked weight, the largest half-swing between turning points.

  Args:
    latent: ``[steps, K]`` latent values of ``K`` tracked weights.

  Returns:
    ``[K]`` amplitudes (0 for a weight that never turns).

  Examples:
    >>> import numpy as np
    >>> w = np.array([[0.0], [0.2], [0.1], [0.3], [0.3], [0.0]])
    >>> oscillation_amplitudes(w).round(3).tolist()
    [0.1]
  """
  latent = np.asarray(latent, np.float64)
  if latent.ndim != 2:
    raise ValueError(f"latent trace must be [steps, tracked weights], got "
                     f"shape {latent.shape}.")
  out = np.zeros(latent.shape[1])
  for k in range(latent.shape[1]):
    w = latent[:, k]
    d = np.diff(w)
    keep = d != 0  # a step of exactly 0 neither turns nor swings
    w_moving = np.concatenate([w[:1], w[1:][keep]])
    d = d[keep]
    if d.size < 2:
      continue
    turns = np.nonzero(np.sign(d[1:]) != np.sign(d[:-1]))[0] + 1
    if turns.size < 2:
      continue
    swings = np.abs(np.diff(w_moving[turns]))
    out[k] = 0.5 * swings.max()
  return out


def flip_counts(quantized) -> np.ndarray:
  """Per tracked weight, the number of steps its quantized value changed.

  Examples:
    >>> import numpy as np
    >>> flip_counts(np.array([[1., 1.], [-1., 1.], [1., 1.]])).tolist()
    [2, 0]
  """
  quantized = np.asarray(quantized)
  if quantized.ndim != 2:
    raise ValueError(f"quantized trace must be [steps, tracked weights], "
                     f"got shape {quantized.shape}.")
  return np.sum(quantized[1:] != quantized[:-1], axis=0)


def table1_stats(latent, quantized) -> Dict[str, float]:
  """Table 1's amplitude and frequency of a recorded window.

  Args:
    latent: ``[steps, K]`` latent values of the tracked weights, one row per
      step of the window.
    quantized: ``[steps, K]`` their quantized values.

  Returns:
    ``amplitude`` (max over weights), ``amplitude_mean``, ``frequency``
    (mean number of flips per weight), ``frequency_max``, ``steps``,
    ``tracked``.
  """
  latent, quantized = _check_trace(latent, quantized)
  if latent.shape[0] < 2 or latent.shape[1] < 1:
    raise ValueError(f"need at least 2 steps and 1 tracked weight, got a "
                     f"trace of shape {latent.shape}.")
  amp = oscillation_amplitudes(latent)
  flips = flip_counts(quantized)
  return dict(amplitude=float(amp.max()), amplitude_mean=float(amp.mean()),
              frequency=float(flips.mean()),
              frequency_max=float(flips.max()),
              steps=int(latent.shape[0]), tracked=int(latent.shape[1]))


def step_diagnostics(opt_state) -> Dict[str, jax.Array]:
  """``flip_fraction``, ``update_cosine``, ``trial_active`` of a state.

  Read with ``optax.tree.get``; a state without them (``fp``, plain Adam)
  gives zeros.

  Examples:
    >>> import jax.numpy as jnp, blaq_jax
    >>> state = blaq_jax.laq(0.1).init({"kernel": jnp.ones((2, 2))})
    >>> sorted(step_diagnostics(state))
    ['flip_fraction', 'trial_active', 'update_cosine']
  """
  out = {}
  for name in DIAGNOSTICS:
    value = optax.tree.get(opt_state, name, default=None)
    out[name] = (jnp.zeros([], jnp.float32) if value is None
                 else jnp.asarray(value, jnp.float32))
  return out


def choose_tracked(params, quantize_bits: Sequence[int], num: int,
                   seed: int) -> Tuple[Tuple[int, int], ...]:
  """A fixed random set of ``(leaf index, flat index)`` to track.

  Drawn among the entries of the quantized leaves (bit width > 0; all
  leaves of rank >= 2 if none is quantized), in proportion to their sizes.

  Args:
    params: the params tree.
    quantize_bits: per leaf (``jax.tree.leaves`` order) bit width, 0 for
      full precision.
    num: how many entries to track.
    seed: numpy seed of the draw.

  Returns:
    A tuple of ``(leaf, index)`` pairs.
  """
  leaves = jax.tree.leaves(params)
  if len(quantize_bits) != len(leaves):
    raise ValueError(f"quantize_bits has {len(quantize_bits)} entries, the "
                     f"params {len(leaves)} leaves.")
  pool = [i for i, b in enumerate(quantize_bits) if b]
  if not pool:
    pool = [i for i, x in enumerate(leaves) if np.ndim(x) >= 2]
  if num <= 0 or not pool:
    return ()
  sizes = np.array([np.size(leaves[i]) for i in pool], np.int64)
  rng = np.random.default_rng(seed)
  flat = rng.choice(int(sizes.sum()), size=min(num, int(sizes.sum())),
                    replace=False)
  flat.sort()
  bounds = np.cumsum(sizes)
  out = []
  for f in flat:
    j = int(np.searchsorted(bounds, f, side="right"))
    start = 0 if j == 0 else int(bounds[j - 1])
    out.append((pool[j], int(f - start)))
  return tuple(out)


def gather_tracked(tree, tracked) -> jax.Array:
  """The tracked entries of a tree (``jax.tree.leaves`` order), ``[K]``.

  Leaves that are ``optax.MaskedNode`` are not leaves: use it on a tree of
  the params' structure, e.g. ``blaq_jax.latent_params`` filled in with the
  params.
  """
  leaves = jax.tree.leaves(tree)
  if not tracked:
    return jnp.zeros([0], jnp.float32)
  return jnp.stack([jnp.ravel(leaves[i])[j].astype(jnp.float32)
                    for i, j in tracked])


def latent_or_params(params, opt_state):
  """The latent weights of a blaq_jax state, the params at other leaves.

  For a state without latent weights (``fp``) this is ``params``.
  """
  try:
    latent = blaq_jax.latent_params(opt_state)
  except ValueError:
    return params
  treedef = jax.tree.structure(params)
  lat = treedef.flatten_up_to(latent)
  return treedef.unflatten([
      p if isinstance(w, optax.MaskedNode) else w
      for p, w in zip(jax.tree.leaves(params), lat)])


def codes_or_signs(params, opt_state):
  """The level indices of the quantized leaves, ``sign`` of other leaves.

  A flip is a change of the level (``beta``), not of ``alpha * beta``: with
  a scale that moves every step the quantized *values* change every step.
  """
  try:
    codes = blaq_jax.codes(opt_state)
  except ValueError:
    return jax.tree.map(jnp.sign, params)
  treedef = jax.tree.structure(params)
  return treedef.unflatten([
      jnp.sign(p) if isinstance(c, optax.MaskedNode) else c
      for p, c in zip(jax.tree.leaves(params),
                      treedef.flatten_up_to(codes))])


def format_table(rows: Dict[str, Dict[str, Any]]) -> str:
  """A markdown table of :func:`table1_stats` results keyed by run name.

  Examples:
    >>> print(format_table({"laq": dict(amplitude=1e-3, frequency=4.0,
    ...                                 steps=10, tracked=2)}))
    | run | amplitude | frequency | steps | tracked |
    |---|---|---|---|---|
    | laq | 0.001000 | 4.00 | 10 | 2 |
  """
  lines = ["| run | amplitude | frequency | steps | tracked |",
           "|---|---|---|---|---|"]
  for name, s in rows.items():
    lines.append(f"| {name} | {s['amplitude']:.6f} | {s['frequency']:.2f} | "
                 f"{s['steps']} | {s['tracked']} |")
  return "\n".join(lines)


def summarize_runs(workdirs: Sequence[str]) -> list:
  """One row per run found under comparison directories.

  Reads ``<workdir>/<method>/seed_*/summary.json`` (Table 1's statistics of
  the tracked weights, final accuracy) and ``metrics/epochs.jsonl`` (the
  per-step signals, averaged over the epochs) of every run.

  Example:
    >>> import json, pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "laq" / "seed_0"
    >>> (d / "metrics").mkdir(parents=True)
    >>> _ = (d / "summary.json").write_text(json.dumps(dict(
    ...     method="laq", bits=1, seed=0, final_test_accuracy=0.98,
    ...     zigzag=dict(amplitude=1e-3, amplitude_mean=5e-4, frequency=2.0,
    ...                 steps=10, tracked=4))))
    >>> _ = (d / "metrics" / "epochs.jsonl").write_text(json.dumps(dict(
    ...     flip_fraction=1e-4, update_cosine=0.5)) + chr(10))
    >>> [(r["method"], r["bits"], r["flips_per_step"]) for r in
    ...  summarize_runs([str(d.parent.parent)])]
    [('laq', 1, 0.0001)]
  """
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  rows = []
  for workdir in workdirs:
    summaries = sorted(pathlib.Path(workdir).glob("*/seed_*/summary.json"))
    if not summaries:
      raise FileNotFoundError(f"No finished runs (<method>/seed_*/"
                              f"summary.json) under {workdir}.")
    for path in summaries:
      s = json.loads(path.read_text())
      epochs = [json.loads(line) for line in
                (path.parent / "metrics" / "epochs.jsonl").read_text()
                .splitlines() if line.strip()]
      z = s.get("zigzag") or {}
      rows.append(dict(
          workdir=workdir, method=s["method"], bits=s["bits"],
          seed=s["seed"], test_accuracy=s["final_test_accuracy"],
          flips_per_step=float(np.mean([e["flip_fraction"] for e in epochs])),
          update_cosine=float(np.mean([e["update_cosine"] for e in epochs])),
          amplitude=z.get("amplitude"), amplitude_mean=z.get("amplitude_mean"),
          frequency=z.get("frequency"), steps=z.get("steps"),
          tracked=z.get("tracked")))
  return rows


def main(argv: Sequence[str] | None = None) -> list:
  """``python -m experiments.zigzag DIR...``: the zig-zag table of runs."""
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description="Zig-zag statistics of the runs "
                              "of experiments.compare directories.")
  p.add_argument("workdirs", nargs="+")
  rows = summarize_runs(p.parse_args(argv).workdirs)

  def num(x, fmt):
    return "-" if x is None else format(x, fmt)

  print("| method | bits | final test acc (%) | flips per step (% of weights) "
        "| update cosine | amplitude (max) | amplitude (mean) | flips per "
        "tracked weight | steps x tracked |")
  print("|---|---|---|---|---|---|---|---|---|")
  order = {w: i for i, w in
           enumerate(dict.fromkeys(r["workdir"] for r in rows))}
  for r in sorted(rows, key=lambda r: (order[r["workdir"]], r["bits"],
                                       r["method"], r["seed"])):
    print(f"| {r['method']} | {r['bits']} | {100 * r['test_accuracy']:.2f} "
          f"| {100 * r['flips_per_step']:.4f} | {r['update_cosine']:.3f} "
          f"| {num(r['amplitude'], '.2e')} | {num(r['amplitude_mean'], '.2e')}"
          f" | {num(r['frequency'], '.2f')} | {r['steps']} x {r['tracked']} |")
  return rows


if __name__ == "__main__":
  main()
