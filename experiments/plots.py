r"""Figures of the experiments, written as PNG with matplotlib (Agg backend).

* :func:`plot_training_loss`: training loss against steps (the paper's
  Fig. 5), one curve per run.
* :func:`plot_test_accuracy`: test accuracy per epoch (Fig. 6).
* :func:`plot_zigzag`: per-step flip fraction and update cosine, and the
  trajectories of the tracked latent weights (Table 1's raw material).
* :func:`toy_trajectories` / :func:`plot_toy_trajectories` /
  :func:`plot_fig1`: Fig. 1, LAQ and BLAQ at 1 bit on the toy loss

  .. math::

    \ell(w) = 5 (w_1 - 0.054)^2 + (w_2 + 0.055)^2

  from the same start, at a step multiplier ``s = eta / eta_Newton`` (the
  latent step is ``s`` times the Newton step ``H^{-1} grad``). At ``s = 1``
  LAQ takes the exact Newton step and cannot zig-zag; at ``s`` near 2 it
  overshoots every step (Theorem 2: BLAQ helps where ``s > 2 / (1 + a)``).
  ``python -m experiments.plots fig1 --out fig1.png`` draws both.

Runs are given as ``{label: records}`` where records are the dicts of the
JSON-lines metrics files written by :mod:`experiments.train`.

Example:
  >>> from experiments.plots import toy_trajectories
  >>> paths = toy_trajectories(steps=5)
  >>> sorted(paths), paths["laq"]["latent"].shape
  (['blaq', 'laq'], (6, 2))
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

Records = List[Mapping]


def pyplot():
  """matplotlib's pyplot on the non-interactive Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path: str) -> str:
  """Writes ``fig`` to ``path`` (creating its folder), closes it, returns it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  pyplot().close(fig)
  return path


def _series(records: Iterable[Mapping], x: str, y: str):
  pts = [(r[x], r[y]) for r in records if x in r and y in r
         and r[y] is not None]
  if not pts:
    return np.zeros(0), np.zeros(0)
  xs, ys = zip(*pts)
  return np.asarray(xs, float), np.asarray(ys, float)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
  if window <= 1 or y.size < window:
    return y
  c = np.cumsum(np.insert(y, 0, 0.0))
  head = c[1:window] / np.arange(1, window)
  return np.concatenate([head, (c[window:] - c[:-window]) / window])


def plot_training_loss(runs: Mapping[str, Records], path: str, *,
                       smooth: int = 1, log_scale: bool = True) -> str:
  """Training loss per step of each run (Fig. 5); returns ``path``.

  Args:
    runs: ``{label: step records}`` with ``step`` and ``loss`` fields.
    path: the PNG file to write.
    smooth: moving-average window in logged points (1: none).
    log_scale: logarithmic loss axis.
  """
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, records in runs.items():
    x, y = _series(records, "step", "loss")
    if x.size:
      ax.plot(x, _smooth(y, smooth), label=label, lw=1.2)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss")
  if log_scale:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("Training loss")
  return save_figure(fig, path)


def plot_test_accuracy(runs: Mapping[str, Records], path: str, *,
                       key: str = "test_accuracy",
                       spread: Optional[Mapping[str, Sequence[float]]] = None,
                       x: str = "epoch") -> str:
  """Test accuracy per epoch of each run (Fig. 6); returns ``path``.

  Args:
    runs: ``{label: epoch records}`` with ``x`` and ``key`` fields.
    path: the PNG file to write.
    key: the plotted field.
    spread: optional ``{label: per-epoch half-width}`` drawn as a band.
    x: the field on the horizontal axis: ``"epoch"``, or e.g.
      ``"wall_time"`` or ``"grad_evals"`` for accuracy against cost.
  """
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  xname = x
  for label, records in runs.items():
    x, y = _series(records, xname, key)
    if not x.size:
      continue
    (line,) = ax.plot(x, 100 * y, marker="o", ms=3, label=label)
    if spread and label in spread:
      s = 100 * np.asarray(spread[label], float)[:y.size]
      ax.fill_between(x, 100 * y - s, 100 * y + s, alpha=0.2,
                      color=line.get_color())
  ax.set_xlabel(xname.replace("_", " ") + (" (s)" if xname == "wall_time"
                                            else ""))
  ax.set_ylabel(key.replace("_", " ") + " (%)")
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("Test accuracy")
  return save_figure(fig, path)


def plot_zigzag(records: Records, path: str, *,
                latent: Optional[np.ndarray] = None,
                quantized: Optional[np.ndarray] = None,
                steps: Optional[np.ndarray] = None,
                max_tracked: int = 6) -> str:
  """Zig-zag statistics of one run; returns ``path``.

  Top: per-step ``flip_fraction`` and ``update_cosine`` (near -1: the
  latent update reverses, a zig-zag). Bottom (if a trace is given): latent
  trajectories of up to ``max_tracked`` tracked weights, with their
  quantized values dashed.

  Args:
    records: step records (``step``, ``flip_fraction``, ``update_cosine``).
    path: the PNG file to write.
    latent, quantized: ``[T, K]`` trace of the tracked weights.
    steps: ``[T]`` step numbers of the trace (default ``0..T-1``).
    max_tracked: how many tracked weights to draw.
  """
  plt = pyplot()
  rows = 3 if latent is not None else 2
  fig, axes = plt.subplots(rows, 1, figsize=(7, 2.4 * rows), sharex=True)
  x, y = _series(records, "step", "flip_fraction")
  axes[0].plot(x, y, lw=0.8)
  axes[0].set_ylabel("flip fraction")
  axes[0].set_yscale("symlog", linthresh=1e-4)
  x, y = _series(records, "step", "update_cosine")
  axes[1].plot(x, y, lw=0.8, color="tab:orange")
  axes[1].axhline(0.0, color="k", lw=0.5)
  axes[1].set_ylabel("update cosine")
  if latent is not None:
    latent = np.asarray(latent)
    t = np.arange(latent.shape[0]) if steps is None else np.asarray(steps)
    for k in range(min(max_tracked, latent.shape[1])):
      (line,) = axes[2].plot(t, latent[:, k], lw=0.8)
      if quantized is not None:
        axes[2].plot(t, np.asarray(quantized)[:, k], ls="--", lw=0.6,
                     color=line.get_color())
    axes[2].set_ylabel("tracked weights")
  axes[-1].set_xlabel("step")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].set_title("Zig-zag statistics")
  return save_figure(fig, path)


def toy_loss(w):
  """The loss of the paper's Fig. 1 at ``w = (w1, w2)``."""
  return 5.0 * (w[..., 0] - 0.054) ** 2 + (w[..., 1] + 0.055) ** 2


def toy_trajectories(start=(-0.05, 0.06), *, steps: int = 20,
                     a: float = 0.6, curvature: str = "hessian",
                     learning_rate: float = 1.0,
                     multiplier: float = 1.0) -> Dict[str, Dict]:
  r"""LAQ and BLAQ at 1 bit on the toy loss of Fig. 1 from ``start``.

  The two weights form one binarized tensor (one scale ``alpha``), trained
  by :func:`blaq_jax.laq` and :func:`blaq_jax.blaq` (opaque mode, the exact
  gradient as ``grad_fn``). With ``curvature="hessian"`` the diagonal
  curvature is ``D = H / s``, the exact Hessian ``diag(10, 2)`` divided by
  the step multiplier ``s``, and there is no momentum (``b1 = 0``), so LAQ is
  the recursion of the paper's analysis,
  :math:`w_{t+1} = w_t - s H^{-1} \nabla \ell(q_t)` (``s = 1``: the Newton
  step; the learning rate cancels in ``m / D`` and plays no part);
  ``"adam"`` uses the library's default Adam curvature with
  ``learning_rate``.

  Args:
    start: the initial latent point ``(w1, w2)``.
    steps: number of updates.
    a: BLAQ's blend weight.
    curvature: ``"hessian"`` or ``"adam"``.
    learning_rate: the transforms' learning rate (``"adam"`` only).
    multiplier: ``s = eta / eta_Newton`` (``"hessian"`` only).

  Returns:
    ``{"laq": path, "blaq": path}``, each ``{"latent": [steps + 1, 2],
    "quantized": [steps + 1, 2], "loss": [steps + 1]}`` (loss at the
    quantized point).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import blaq_jax  # pylint: disable=g-import-not-at-top

  if curvature not in ("hessian", "adam"):
    raise ValueError(f"curvature must be 'hessian' or 'adam', got "
                     f"{curvature!r}.")
  if not multiplier > 0:
    raise ValueError(f"multiplier must be positive, got {multiplier!r}.")
  if curvature == "adam" and multiplier != 1.0:
    raise ValueError("multiplier applies to curvature='hessian'; with "
                     "'adam' set learning_rate instead.")
  start = np.asarray(start, np.float32)
  if start.shape != (2,):
    raise ValueError(f"start must be a point (w1, w2), got {start!r}.")

  def loss(p):
    return toy_loss(p["kernel"][0])

  grad = jax.grad(loss)
  b1 = 0.0 if curvature == "hessian" else 0.9
  extra = {}
  if curvature == "hessian":
    hess = {"kernel": jnp.array([[10.0, 2.0]]) / multiplier}
    extra["curvature_fn"] = lambda p: hess
  transforms = {"laq": blaq_jax.laq(learning_rate, b1=b1),
                "blaq": blaq_jax.blaq(learning_rate, a=a, b1=b1)}
  out = {}
  for name, opt in transforms.items():
    params = {"kernel": jnp.asarray(start)[None]}
    state = opt.init(params)
    params = blaq_jax.quantized_params(params, state)

    @jax.jit
    def step(params, state, opt=opt):
      updates, state = opt.update(grad(params), state, params,
                                  grad_fn=grad, **extra)
      return optax.apply_updates(params, updates), state

    latent, quant = [start], [np.asarray(params["kernel"][0])]
    for _ in range(steps):
      params, state = step(params, state)
      latent.append(np.asarray(blaq_jax.latent_params(state)["kernel"][0]))
      quant.append(np.asarray(params["kernel"][0]))
    quant = np.stack(quant)
    out[name] = {"latent": np.stack(latent), "quantized": quant,
                 "loss": np.asarray(toy_loss(quant))}
  return out


def _draw_toy(ax, ax_loss, paths: Dict, title: str) -> None:
  """Latent/quantized paths over the contours (``ax``) and the loss curves."""
  pts = np.concatenate([np.concatenate([p["latent"], p["quantized"]])
                        for p in paths.values()])
  lo, hi = pts.min(0), pts.max(0)
  pad = 0.15 * (hi - lo) + 1e-3
  g1, g2 = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], 200),
                       np.linspace(lo[1] - pad[1], hi[1] + pad[1], 200))
  ax.contour(g1, g2, toy_loss(np.stack([g1, g2], -1)), levels=15,
             cmap="Greys", linewidths=0.6)
  ax.plot(0.054, -0.055, "k*", ms=10, label="minimum")
  for (name, p), color in zip(paths.items(), ("tab:red", "tab:blue")):
    ax.plot(*p["latent"].T, "-o", ms=3, color=color, label=f"{name} latent")
    ax.plot(*p["quantized"].T, ":", marker="s", ms=3, color=color,
            alpha=0.6, label=f"{name} quantized")
    ax_loss.plot(p["loss"], "-o", ms=3, color=color, label=name)
  ax.set_xlabel("$w_1$")
  ax.set_ylabel("$w_2$")
  ax.legend(fontsize=7)
  ax.set_title(title, fontsize=9)
  ax_loss.set_yscale("log")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("loss at the quantized point")
  ax_loss.grid(alpha=0.3)
  ax_loss.legend()


def plot_toy_trajectories(path: str, paths: Optional[Dict] = None,
                          **kwargs) -> str:
  """Fig. 1 at one step size: paths over the contours, and the loss.

  Args:
    path: the PNG file to write.
    paths: the output of :func:`toy_trajectories` (computed with
      ``**kwargs`` if not given).
  """
  if paths is None:
    paths = toy_trajectories(**kwargs)
  plt = pyplot()
  fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(10, 4.2))
  _draw_toy(ax, ax_loss,
            paths, r"$\ell(w)=5(w_1-0.054)^2+(w_2+0.055)^2$, 1 bit")
  return save_figure(fig, path)


def fig1_caption(multiplier: float, stats: Mapping[str, Mapping],
                 a: float = 0.6) -> str:
  """What the Fig. 1 row at step multiplier ``multiplier`` shows."""
  laq, blaq = stats["laq"], stats["blaq"]
  threshold = 2 / (1 + a)

  def when(r):
    return ("never" if r["steps_to_stay"] is None
            else f"from step {r['steps_to_stay']}")
  name = "the exact Newton step" if multiplier == 1.0 else (
      f"{multiplier:g} times the Newton step")
  side = ("above Theorem 2's threshold" if multiplier > threshold
          else "below Theorem 2's threshold")
  return (f"s = {multiplier:g}: {name}, {side} s > 2 / (1 + a) = "
          f"{threshold:.2f}. Within 1e-3 of the best 1-bit point's loss "
          f"(relative to the start) and staying there: LAQ {when(laq)}, "
          f"BLAQ {when(blaq)}. Turning points of the latent path per "
          f"weight: LAQ {laq['turning_points']:.1f}, BLAQ "
          f"{blaq['turning_points']:.1f}.")


def plot_fig1(path: str, multipliers: Sequence[float] = (1.0, 1.9), *,
              steps: int = 40, a: float = 0.6) -> Dict[float, Dict]:
  """Fig. 1 at several step multipliers, one row each; returns the stats.

  Each row: left, the latent (solid) and quantized (dotted) paths of LAQ
  and BLAQ over the contours of the toy loss; right, the loss at the
  quantized point per step. Row titles are :func:`fig1_caption`.

  Returns:
    ``{s: {"laq": measures, "blaq": measures, "caption": text}}`` with the
    measures of :func:`experiments.toy_sweep.toy_measures` (tolerance
    1e-3) and the Table 1 statistics of :mod:`experiments.zigzag`.
  """
  from experiments import toy_sweep  # pylint: disable=g-import-not-at-top
  from experiments import zigzag  # pylint: disable=g-import-not-at-top
  best = toy_sweep.best_level_set_loss(toy_sweep.make_toy("fig1"), 1)
  plt = pyplot()
  fig, axes = plt.subplots(len(multipliers), 2,
                           figsize=(11, 4.6 * len(multipliers)),
                           squeeze=False)
  out = {}
  for row, s in zip(axes, multipliers):
    paths = toy_trajectories(steps=steps, a=a, multiplier=float(s))
    stats = {}
    for name, p in paths.items():
      codes = np.sign(p["quantized"])  # 1 bit: the code is the sign
      stats[name] = dict(
          **toy_sweep.toy_measures(toy_loss(p["quantized"]).astype(float),
                                   best, p["latent"], codes, 1e-3),
          **zigzag.table1_stats(p["latent"], codes))
    caption = fig1_caption(float(s), stats, a)
    out[float(s)] = dict(stats, caption=caption)
    _draw_toy(row[0], row[1], paths, "\n".join(_wrap(caption, 70)))
  fig.suptitle(r"Fig. 1 toy $\ell(w)=5(w_1-0.054)^2+(w_2+0.055)^2$, 1 bit, "
               f"b1 = 0, a = {a:g}, D = H / s", fontsize=10)
  save_figure(fig, path)
  return out


def _wrap(text: str, width: int) -> List[str]:
  import textwrap  # pylint: disable=g-import-not-at-top
  return textwrap.wrap(text, width)


def main(argv=None) -> Dict:
  """Writes Fig. 1 and prints what each row shows, with its statistics.

  ``python -m experiments.plots fig1 --out experiments/results/fig1.png``
  draws one row per ``--multipliers`` (default 1 and 1.9: the Newton step,
  where LAQ cannot zig-zag, and a step where it does). The statistics are
  :func:`experiments.toy_sweep.toy_measures` and
  :func:`experiments.zigzag.table1_stats` of the two latent weights over the
  whole run. The leading ``fig1`` may be omitted.
  """
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "fig1":
    argv = argv[1:]
  p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
  p.add_argument("--out", default="fig1.png", help="PNG file to write")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--a", type=float, default=0.6)
  p.add_argument("--multipliers", default="1.0,1.9",
                 help="comma-separated s = eta / eta_Newton, one row each")
  args = p.parse_args(argv)
  mults = [float(x) for x in args.multipliers.split(",") if x.strip()]
  stats = plot_fig1(args.out, mults, steps=args.steps, a=args.a)
  print(f"Fig. 1 toy loss, 1 bit, {args.steps} steps from (-0.05, 0.06), "
        f"b1 = 0, a = {args.a}, D = H / s")
  print("| s | method | steps to stay within 1e-3 | first within | turning "
        "points per weight | latent amplitude (max) | sign flips per weight "
        "| final loss gap |\n|---|---|---|---|---|---|---|---|")
  for s, row in stats.items():
    for name in ("laq", "blaq"):
      r = row[name]
      print(f"| {s:g} | {name} | {r['steps_to_stay']} | {r['steps_to_tol']} "
            f"| {r['turning_points']:.1f} | {r['amplitude']:.3g} | "
            f"{r['frequency']:.3g} | {r['final_gap']:.3g} |")
  print()
  for s, row in stats.items():
    print(f"Row s = {s:g}: {row['caption']}")
  print(f"Written: {args.out}")
  return stats


if __name__ == "__main__":
  main()
