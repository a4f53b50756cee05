r"""Weak scaling of data-parallel BLAQ training over 1, 2, 4, 8 devices.

The batch per device is fixed; ``n`` devices train on a global batch of
``n`` times it with ``config.num_devices = n`` (the ``"data"`` mesh of
``experiments.train``: batch sharded, params and optimizer state
replicated). For each ``n`` the table gives the time of BLAQ's inactive step
(LAQ's update) and of its active step (two gradient evaluations), timed as
in :mod:`experiments.bench.train_step` (the training step itself, state
donated, interleaved rounds, medians), the amortised step
``((m - 1) inactive + active) / m``, examples per second at that rate, and
the weak-scaling efficiency ``t_1 / t_n`` of the amortised step.

The communication comes from the compiled HLO of each phase's step (as
training compiles them, see :meth:`experiments.train.Setup.compiled_step`):
every collective op (on a data-parallel step, all-reduces) and the bytes of
its operands, on the costliest path through any conditional. Expected: one all-reduce of the
gradient per gradient evaluation (XLA combines the leaves into few ops), so
about the params' bytes on an inactive step and twice that on an active
one, plus the batch-norm statistics and a few scalars. These are payload
bytes: a ring all-reduce sends ``2 (n - 1) / n`` times them per device.

Run as a script, it gives the host platform 8 devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) unless
``XLA_FLAGS`` already sets a count. Those CPU devices share the machine's
cores, so their step time grows with ``n``; on a machine with several
accelerators the same script times the real devices.

Usage::

  python -m experiments.bench.scaling --model mlp --per-device-batch 32

Example:
  >>> from experiments.bench.scaling import collectives
  >>> hlo = "\n".join([
  ...     "%on (p: f32[8]) -> f32[8] {",
  ...     "  ROOT %ar = f32[8]{0} all-reduce(%p), to_apply=%add",
  ...     "}",
  ...     "ENTRY %main (a: f32[8], c: pred[]) -> f32[8] {",
  ...     "  %ar.1 = (f32[8]{0}, f32[2]{0}) all-reduce(%a, %b), to_apply=%add",
  ...     "  ROOT %r = f32[8]{0} conditional(%c, %a, %a), "
  ...     "branch_computations={%on, %off}",
  ...     "}"])
  >>> out = collectives(hlo)
  >>> out["min"], out["max"], out["kinds"]
  ({'ops': 1, 'bytes': 40}, {'ops': 2, 'bytes': 72}, ['all-reduce'])
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count"
if __name__ == "__main__" and _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" {_FLAG}=8").strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import functools
import math
import re
from typing import Any, Dict, List, Optional, Sequence

import jax

from experiments import train
from experiments.bench import common
from experiments.bench import train_step as ts

COLLECTIVES = ("all-reduce", "all-reduce-start", "all-gather",
               "all-gather-start", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-permute-start")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}|"
                       r"(?:true|false)_computation=%?([\w.\-]+)")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition)="
                    r"(?:\{([^}]*)\}|%?([\w.\-]+))")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
          "f64": 8, "c64": 8, "c128": 16}


def _split_shape(rest: str):
  """``(shape, op, tail)`` of an instruction's right-hand side."""
  if rest.startswith("("):  # a tuple shape: up to its closing parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        break
    shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  op, _, tail = rest.partition("(")
  return shape, op.strip(), tail


def _names(text: str) -> List[str]:
  return [x.strip().lstrip("%") for x in text.split(",") if x.strip()]


def collectives(hlo_text: str) -> Dict[str, Any]:
  """Collective ops of a compiled HLO module and their operands' bytes.

  A computation's count is its own collectives plus those of everything it
  calls; at a ``conditional`` only one branch runs, so two paths are
  counted: ``min`` takes the branch with the fewest bytes, ``max`` the
  most. A ``while`` body is counted once.

  Args:
    hlo_text: ``compiled.as_text()`` of a jitted function.

  Returns:
    ``{"min": {"ops", "bytes"}, "max": {"ops", "bytes"}, "kinds": [...]}``.
  """
  own, calls, branches, entry, current = {}, {}, {}, None, None
  kinds = set()
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      m = _HEADER.match(line)
      current = m.group(2) if m else None
      if m:
        own[current], calls[current], branches[current] = [0, 0], [], []
        entry = current if m.group(1) else entry
      continue
    m = _INSTR.match(line)
    if current is None or not m:
      continue
    shape, op, tail = _split_shape(line[m.end():])
    if op in COLLECTIVES:
      kinds.add(op)
      own[current][0] += 1
      own[current][1] += sum(
          _BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
          for t, dims in _ARRAY.findall(shape))
    found = [_names(a) if a else [b] for a, b in _BRANCHES.findall(tail)]
    if found:
      branches[current].append([n for group in found for n in group])
    for group, name in _CALLS.findall(tail):
      calls[current] += _names(group) if group else [name]

  @functools.lru_cache(maxsize=None)
  def path(name: str, pick) -> tuple:
    ops, nbytes = own.get(name, (0, 0))
    for callee in calls.get(name, ()):
      o, b = path(callee, pick)
      ops, nbytes = ops + o, nbytes + b
    for group in branches.get(name, ()):
      o, b = pick((path(c, pick) for c in group), key=lambda x: x[1])
      ops, nbytes = ops + o, nbytes + b
    return ops, nbytes

  out = {k: dict(zip(("ops", "bytes"), path(entry, pick)))
         for k, pick in (("min", min), ("max", max))}
  out["kinds"] = sorted(kinds)
  return out


def measure(model: str, devices: Sequence[int], *, per_device_batch: int,
            repeats: int, **config_kw) -> List[Dict[str, Any]]:
  """One row per device count; all steps timed in the same rounds."""
  runners, checks, rows = {}, [], []
  for n in devices:
    batch_size = per_device_batch * n
    setup = train.Setup(ts.make_config(
        model, "blaq", batch=batch_size, num_devices=n,
        n_train=batch_size * (ts.WARMUP + repeats + 1), **config_kw))
    new, compiled, check = ts.step_runners(setup, ts.fixed_batch(setup),
                                           ["blaq inactive", "blaq active"])
    runners.update({(n, k): v for k, v in new.items()})
    checks.append(check)
    inactive = collectives(compiled["blaq inactive"].as_text())
    active = collectives(compiled["blaq active"].as_text())
    rows.append(dict(
        model=model, devices=n, batch=batch_size,
        m=setup.config.blaq_period_epochs,
        params_bytes=common.tree_bytes(setup.init_state["params"]),
        ops_inactive=inactive["max"]["ops"], ops_active=active["max"]["ops"],
        bytes_inactive=inactive["max"]["bytes"],
        bytes_active=active["max"]["bytes"],
        kinds=sorted(set(inactive["kinds"]) | set(active["kinds"]))))
  samples = common.time_interleaved(runners, repeats=repeats,
                                    warmup=ts.WARMUP)
  for check in checks:
    check()
  for r in rows:
    t_in = common.median(samples[(r["devices"], "blaq inactive")])
    t_act = common.median(samples[(r["devices"], "blaq active")])
    t = ((r["m"] - 1) * t_in + t_act) / r["m"]
    r.update(ms_inactive=1e3 * t_in, ms_active=1e3 * t_act,
             ms_amortised=1e3 * t, examples_per_s=r["batch"] / t)
  for r in rows:
    r["efficiency"] = rows[0]["ms_amortised"] / r["ms_amortised"]
  return rows


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="mlp", choices=sorted(ts.MODELS))
  p.add_argument("--devices", default="1,2,4,8",
                 help="comma-separated device counts")
  p.add_argument("--per-device-batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=10,
                 help="interleaved rounds (median over them)")
  p.add_argument("--hidden", default=None,
                 help="FC widths replacing the model's, e.g. 16,16")
  p.add_argument("--resnet-image", type=int, default=64)
  p.add_argument("--synthetic", action="store_true",
                 help="MNIST-shaped random images instead of MNIST")
  p.add_argument("--data-dir", default="", help="the MNIST originals")
  args = p.parse_args(argv)
  available = jax.device_count()
  devices = [int(n) for n in args.devices.split(",") if n]
  skipped = [n for n in devices if n > available]
  devices = [n for n in devices if n <= available]
  print(f"machine: {common.machine()}")
  dev = jax.devices()[0]
  if dev.platform == "cpu" and max(devices) > 1:
    print(f"note: the {available} CPU devices are XLA host-platform devices "
          f"sharing this machine's {os.cpu_count()} cores, so the step time "
          "grows with the device count; the all-reduce counts and bytes "
          "(from the compiled HLO) are those of a real machine.")
  if skipped:
    print(f"skipped device counts {skipped}: only {available} devices.")
  rows = measure(args.model, devices, per_device_batch=args.per_device_batch,
                 repeats=args.repeats, synthetic=args.synthetic,
                 data_dir=args.data_dir, hidden=ts.int_list(args.hidden),
                 resnet_image=args.resnet_image)
  mb = 1e6
  r0 = rows[0]
  print(f"\n{args.model} BLAQ, {r0['params_bytes'] / mb:.2f} MB of params, "
        f"per-device batch {args.per_device_batch}, m = {r0['m']}; median "
        f"of {args.repeats} interleaved rounds; MB = 1e6 bytes all-reduced "
        "per step (inactive / active)")
  print(common.markdown_table(
      ["devices", "global batch", "inactive ms", "active ms", "amortised ms",
       "examples/s", "weak-scaling eff.", "all-reduces", "MB", "MB / params"],
      [[r["devices"], r["batch"], r["ms_inactive"], r["ms_active"],
        r["ms_amortised"], r["examples_per_s"], r["efficiency"],
        f"{r['ops_inactive']} / {r['ops_active']}",
        f"{r['bytes_inactive'] / mb:.3g} / {r['bytes_active'] / mb:.3g}",
        f"{r['bytes_inactive'] / r['params_bytes']:.2f} / "
        f"{r['bytes_active'] / r['params_bytes']:.2f}"] for r in rows]))
  kinds = sorted({k for r in rows for k in r["kinds"]})
  print(f"collective ops in the step: {', '.join(kinds) or 'none'}")
  return rows


if __name__ == "__main__":
  main()
