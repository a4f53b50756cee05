r"""Statistics that can tell: n, sample spread, paired intervals, fixed targets.

Every table of the experiments reports, per method,

* :func:`summarize`: the number of runs ``n``, the mean and the *sample*
  standard deviation

  .. math::

    \bar x = \frac1n \sum_i x_i, \qquad
    s = \sqrt{\frac{1}{n-1} \sum_i (x_i - \bar x)^2}

  (undefined for ``n = 1``: printed without a spread, never as ``± 0``);
* :func:`paired_difference`: for two methods run with the same seeds (same
  initialisation and data order per pair), the differences
  :math:`d_i = x_i - y_i`, their mean and the 95% Student-t interval

  .. math::

    \bar d \pm t_{0.975,\, n-1}\, s_d / \sqrt n ,

  which says whether the data can tell the methods apart (an interval that
  contains 0 cannot);
* :func:`select_by_validation`: the "best" epoch is the one with the highest
  *validation* accuracy; the test accuracy is read at that epoch. Picking
  the epoch on the test set would report the maximum of noisy test values,
  biased upwards;
* :func:`first_reaching`: the epoch (or step) at which a run first reaches a
  target fixed *before* the runs (by the caller or the config). A run that
  never reaches it is reported as not reached, never dropped
  (:func:`format_reach`).

The t quantile comes from :func:`scipy.stats.t.ppf` (scipy is a dependency
of JAX).

Example:
  >>> from experiments import stats
  >>> stats.format_summary(stats.summarize([0.9875, 0.9880, 0.9870]), 100)
  '98.75 ± 0.05 (n = 3)'
  >>> d = stats.paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])
  >>> round(d.mean, 4), round(d.low, 4), round(d.high, 4)
  (2.0, -0.4841, 4.4841)
  >>> recs = [dict(epoch=1, validation_accuracy=0.95, test_accuracy=0.96),
  ...         dict(epoch=2, validation_accuracy=0.97, test_accuracy=0.95),
  ...         dict(epoch=3, validation_accuracy=0.96, test_accuracy=0.97)]
  >>> stats.select_by_validation(recs)["epoch"]
  2
  >>> stats.first_reaching(recs, 0.965).at, stats.first_reaching(recs, 0.99)
  (3, Reach(reached=False, at=None, record=None))
"""

from __future__ import annotations

import math
from typing import Any, Iterable, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np


class Summary(NamedTuple):
  """``n``, mean and sample standard deviation (``None`` if ``n < 2``)."""
  n: int
  mean: Optional[float]
  std: Optional[float]


class PairedDifference(NamedTuple):
  """Mean paired difference ``x - y`` with its 95% t-interval."""
  n: int
  mean: float
  std: float
  low: float
  high: float


class Reach(NamedTuple):
  """Whether a run reached a target, when (``at``) and the record there."""
  reached: bool
  at: Any
  record: Optional[Mapping[str, Any]]


def _finite(values: Iterable[Any], what: str) -> np.ndarray:
  x = np.asarray([v for v in values], dtype=float)
  if x.ndim != 1:
    raise ValueError(f"{what}: expected a flat list of numbers, got shape "
                     f"{x.shape}.")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{what}: non-finite value(s) {x[~np.isfinite(x)]}; "
                     "count diverged or missing runs separately.")
  return x


def summarize(values: Sequence[float]) -> Summary:
  """n, mean and sample standard deviation (ddof = 1) of finite numbers.

  ``n = 0`` gives ``Summary(0, None, None)``; ``n = 1`` has no spread.

  >>> summarize([1.0, 2.0, 4.0])
  Summary(n=3, mean=2.3333333333333335, std=1.5275252316519465)
  """
  x = _finite(values, "summarize")
  if x.size == 0:
    return Summary(0, None, None)
  std = float(x.std(ddof=1)) if x.size >= 2 else None
  return Summary(int(x.size), float(x.mean()), std)


def format_summary(s: Summary, scale: float = 1.0, digits: int = 2) -> str:
  """``"mean ± std (n = k)"``; ``"mean (n = 1)"``; ``"-"`` for ``n = 0``."""
  if s.n == 0:
    return "-"
  if s.std is None:
    return f"{scale * s.mean:.{digits}f} (n = 1)"
  return f"{scale * s.mean:.{digits}f} ± {scale * s.std:.{digits}f} (n = {s.n})"


def t_quantile(p: float, df: int) -> float:
  """The ``p`` quantile of Student's t with ``df`` degrees of freedom.

  >>> round(t_quantile(0.975, 2), 4)
  4.3027
  """
  if not 0 < p < 1:
    raise ValueError(f"t_quantile: p must be in (0, 1), got {p!r}.")
  if int(df) != df or df < 1:
    raise ValueError(f"t_quantile: df must be a positive integer, got {df!r}.")
  from scipy import stats as sp_stats  # pylint: disable=g-import-not-at-top
  return float(sp_stats.t.ppf(p, int(df)))


def paired_difference(x: Sequence[float], y: Sequence[float],
                      confidence: float = 0.95) -> PairedDifference:
  """Mean of ``x_i - y_i`` over pairs with its Student-t interval.

  Args:
    x, y: the two methods' values, paired by position (same seed).
    confidence: the interval's coverage (0.95: the 97.5% t quantile).

  Raises:
    ValueError: lengths differ, fewer than 2 pairs, or a non-finite value.
  """
  x = _finite(x, "paired_difference: x")
  y = _finite(y, "paired_difference: y")
  if x.shape != y.shape:
    raise ValueError(f"paired_difference: {x.size} values against {y.size}; "
                     "pairs need one value of each method per seed.")
  if x.size < 2:
    raise ValueError(f"paired_difference: needs at least 2 pairs, got "
                     f"{x.size}.")
  d = x - y
  n = int(d.size)
  mean, std = float(d.mean()), float(d.std(ddof=1))
  half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
  return PairedDifference(n, mean, std, mean - half, mean + half)


def format_difference(d: PairedDifference, scale: float = 1.0,
                      digits: int = 2) -> str:
  """``"+0.05 [-0.10, +0.20] (n = 8)"``: mean and 95% interval."""
  return (f"{scale * d.mean:+.{digits}f} [{scale * d.low:+.{digits}f}, "
          f"{scale * d.high:+.{digits}f}] (n = {d.n})")


def paired_by_seed(x: Mapping[Any, float], y: Mapping[Any, float]):
  """``(seeds, xs, ys)`` over the seeds both mappings hold, sorted."""
  seeds = sorted(set(x) & set(y))
  return seeds, [x[s] for s in seeds], [y[s] for s in seeds]


def select_by_validation(records: Sequence[Mapping[str, Any]],
                         key: str = "validation_accuracy",
                         report: str = "test_accuracy",
                         x: str = "epoch") -> dict:
  """The record with the highest ``key`` (the earliest on ties).

  Returns:
    ``{x: ..., key: ..., report: ...}`` of that record (``report`` is
    ``None`` if the record lacks it).

  Raises:
    ValueError: no record has ``key`` (no validation split: the best epoch
      cannot be chosen without looking at the test set).
  """
  scored = [r for r in records if r.get(key) is not None]
  if not scored:
    raise ValueError(f"select_by_validation: no record has {key!r}; run with "
                     "a validation split (validation_size > 0) to choose an "
                     "epoch, never choose it on the test set.")
  best = max(scored, key=lambda r: r[key])  # max keeps the first maximum
  return {x: best.get(x), key: best[key], report: best.get(report)}


def first_reaching(records: Sequence[Mapping[str, Any]], target: float,
                   key: str = "test_accuracy", x: str = "epoch",
                   higher_is_better: bool = True) -> Reach:
  """When ``key`` first reaches ``target`` (``>=``; ``<=`` if lower is better).

  ``Reach(False, None, None)`` if it never does: the run stays in the count.
  """
  for r in records:
    v = r.get(key)
    if v is None:
      continue
    if (v >= target) if higher_is_better else (v <= target):
      return Reach(True, r.get(x), r)
  return Reach(False, None, None)


def format_reach(hits: Sequence[Reach], digits: int = 1) -> str:
  """Mean ± sd of ``at`` if every run reached; else says how many did not.

  >>> format_reach([Reach(True, 2, None), Reach(True, 4, None)])
  '3.0 ± 1.4 (n = 2)'
  >>> format_reach([Reach(True, 2, None), Reach(False, None, None)])
  'not reached (1/2 runs; reached: 2)'
  """
  if not hits:
    return "-"
  missed = [h for h in hits if not h.reached]
  if not missed:
    return format_summary(summarize([h.at for h in hits]), digits=digits)
  got = ", ".join(str(h.at) for h in hits if h.reached)
  return (f"not reached ({len(missed)}/{len(hits)} runs"
          + (f"; reached: {got})" if got else ")"))


def parse_targets(text: Any) -> List[float]:
  """Targets from ``"0.98,0.985"``, a number or a sequence, checked in (0, 1].

  >>> parse_targets("0.98, 0.985")
  [0.98, 0.985]
  """
  if text is None or text == "":
    return []
  if isinstance(text, str):
    items = [t.strip() for t in text.split(",") if t.strip()]
  elif isinstance(text, (int, float)):
    items = [text]
  else:
    items = list(text)
  try:
    targets = [float(t) for t in items]
  except ValueError as e:
    raise ValueError(f"targets: not a comma-separated list of numbers: "
                     f"{text!r}.") from e
  bad = [t for t in targets if not 0 < t <= 1]
  if bad:
    raise ValueError(f"targets must be accuracies in (0, 1], got {bad}.")
  return targets
