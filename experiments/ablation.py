r"""Ablation: one config, several variants of its fields, the same seeds.

Each variant is a name and config overrides; every ``(variant, seed)`` is
trained by :func:`experiments.compare.run_all` in ``WORKDIR/<variant>/``
(finished runs are reused, interrupted ones resumed). The table
(``WORKDIR/ablation.md``, also printed) has per variant the mean ± sample
standard deviation (n) over seeds of the final test accuracy, the test
accuracy at the best-validation epoch and the final training loss, and the zig-zag signals averaged over the second half of
training: the fraction of quantized weights that flip per step and the cosine
between successive latent updates.

Usage (the BLAQ ablation of the README)::

  python -m experiments.ablation --config experiments/configs/quick.py \
      --workdir runs/ablation --seeds 0,1,2 \
      --variant laq:method=laq \
      --variant a=0.6:method=blaq,a=0.6 \
      --variant a=0.9:method=blaq,a=0.9 \
      --variant blended:method=blaq,moments=blended

Example:
  >>> from experiments.ablation import parse_variant
  >>> parse_variant("a=0.9:method=blaq,a=0.9,blaq_period_epochs=1")
  ('a=0.9', {'method': 'blaq', 'a': 0.9, 'blaq_period_epochs': 1})
"""

from __future__ import annotations

import ast
import pathlib
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from experiments import compare as compare_lib
from experiments import stats


def _value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word: a string (e.g. method=blaq)


def parse_variant(spec: str) -> Tuple[str, Dict[str, Any]]:
  """``"name:key=value,key=value"`` -> ``(name, {key: value})``."""
  name, sep, body = spec.partition(":")
  if not sep or not name:
    raise ValueError(f"A variant is 'name:key=value,...', got {spec!r}.")
  overrides = {}
  for item in filter(None, body.split(",")):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"Variant {name!r}: {item!r} is not key=value.")
    overrides[key.strip()] = _value(value.strip())
  return name, overrides


def _second_half_mean(steps: List[Mapping], key: str) -> float:
  xs = [r[key] for r in steps[len(steps) // 2:] if key in r]
  return float(np.mean(xs)) if xs else float("nan")


def run(config, variants: Sequence[Tuple[str, Dict[str, Any]]],
        seeds: Sequence[int], workdir: str) -> str:
  """Trains every variant and seed; writes and returns the table."""
  rows = []
  for name, overrides in variants:
    cfg = config.copy_and_resolve_references()
    cfg.unlock()
    for key, value in overrides.items():
      if key == "method":
        continue
      if key not in cfg:
        raise ValueError(f"Variant {name!r}: unknown config field {key!r}.")
      cfg[key] = value
    method = overrides.get("method", cfg.method)
    runs = compare_lib.run_all(cfg, [method], seeds,
                               str(pathlib.Path(workdir) / name))[method]

    def stat(values, scale=1.0, digits=2):
      return stats.format_summary(
          stats.summarize([v for v in values if v is not None]), scale, digits)

    s = [r["summary"] for r in runs]
    rows.append(
        f"| {name} | {stat([x['final_test_accuracy'] for x in s], 100)} | "
        f"{stat([compare_lib.test_at_best_validation(r['epochs']) for r in runs], 100)} | "
        f"{stat([x['final_train_loss'] for x in s], 1, 4)} | "
        f"{stat([_second_half_mean(r['steps'], 'flip_fraction') for r in runs], 100, 3)} | "
        f"{stat([_second_half_mean(r['steps'], 'update_cosine') for r in runs], 1, 3)} |")
  text = "\n".join([
      f"Mean ± sample standard deviation (n seeds) over seeds {list(seeds)}; "
      "test accuracy also at the epoch of best validation accuracy; zig-zag "
      "signals averaged over the second half of the logged steps.", "",
      "| variant | final test acc (%) | test acc at best val (%) | final "
      "train loss "
      "| flips per step (% of weights) | update cosine |",
      "|---|---|---|---|---|---|", *rows])
  (pathlib.Path(workdir) / "ablation.md").write_text(text + "\n")
  return text


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  from experiments import checkpointing  # pylint: disable=g-import-not-at-top
  checkpointing.quiet_orbax_logging()
  f = flags.FLAGS
  variants = [parse_variant(v) for v in f.variant]
  if not variants:
    raise SystemExit("Give at least one --variant name:key=value,...")
  seeds = [int(s) for s in f.seeds.split(",") if s.strip()]
  print(run(f.config, variants, seeds, f.workdir))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Configuration file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory of the ablation.")
  flags.DEFINE_string("seeds", "0", "Comma-separated seeds.")
  flags.DEFINE_multi_string("variant", [], "name:key=value,... (repeat).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
