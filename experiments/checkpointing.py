r"""Checkpoints that cannot be misread, and the workdir's configuration guard.

**Checkpoints.** Orbax writes one checkpoint per epoch under
``WORKDIR/checkpoints/<epoch>/`` (the train state as a list of leaves, and
a JSON ``meta``). Once orbax has finalised a save, :func:`write_digests`
adds ``SHA256SUMS`` to that directory: the SHA-256 of every file of the
checkpoint, in the format of ``sha256sum`` (so ``cd WORKDIR/checkpoints/3 &&
sha256sum -c SHA256SUMS`` checks it by hand too). A checkpoint is *good*
when

1. its ``SHA256SUMS`` exists (a checkpoint without one was interrupted
   between orbax's save and the record: it is treated as incomplete),
2. every file it lists is there, with its digest (:func:`verify_digests`),
3. orbax restores it, and
4. the restored state holds nothing that cannot be
   (:func:`check_state`): no non-finite value anywhere, no negative value
   in a field that is non-negative by definition
   (:data:`NON_NEGATIVE_FIELDS`: Adam's second moments ``nu``, the
   quantization scales ``alpha``).

:meth:`Checkpoints.restore_latest` restores the newest good checkpoint and
says which newer ones it passed over and why; when training resumes, those
are moved to ``WORKDIR/checkpoints_damaged/`` so the epochs after the good
one are trained and saved again. With no good checkpoint it stops
(:class:`CheckpointError`) naming the damaged files and what to do.

**Configuration guard.** A workdir holds one run: ``config.json`` is
written when it starts, and a later run in the same workdir must have the
same configuration (:func:`check_workdir_config`; only the run-control
fields of :data:`RUN_CONTROL_FIELDS` may differ, and ``num_epochs`` may be
raised to extend the run).

Example:
  >>> import hashlib, pathlib, tempfile
  >>> from experiments.checkpointing import verify_digests, write_digests
  >>> step = pathlib.Path(tempfile.mkdtemp())
  >>> _ = (step / "leaves").write_bytes(b"1234")
  >>> write_digests(step)
  >>> verify_digests(step) is None
  True
  >>> _ = (step / "leaves").write_bytes(b"1235")
  >>> print(verify_digests(step))  # doctest: +ELLIPSIS
  file .../leaves: its SHA-256 is not the one recorded after the save ...
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import blaq_jax

# The record of a checkpoint's files, written after orbax finalised it.
DIGESTS = "SHA256SUMS"
# Fields (NamedTuple attributes, dict keys, dataclass fields) whose values
# are non-negative by definition: Adam's second moments (optax's
# ScaleByAdamState.nu, and their roots in blaq_jax's LossAwareState.sqrt_nu)
# and the scales alpha of
# blaq_jax.QuantizedTensor (the projection's alpha > 0).
NON_NEGATIVE_FIELDS = ("nu", "sqrt_nu", "alpha")
# Where a resumed run moves the checkpoints it could not use.
DAMAGED_DIR = "checkpoints_damaged"

# Config fields that control logging and stopping only: a workdir written
# with other values of these is resumed.
RUN_CONTROL_FIELDS = ("data_dir", "num_devices", "eval_batch_size",
                      "log_every_steps", "progress_bar", "write_plots",
                      "tensorboard", "stop_after_epochs", "keep_checkpoints")


class ConfigMismatchError(ValueError):
  """The workdir holds a run with another configuration."""


class CheckpointError(RuntimeError):
  """No checkpoint of the workdir can be used (all are damaged)."""


# ---------------------------------------------------------------- digests --

def sha256(path) -> str:
  """Hex SHA-256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _files(step_dir: pathlib.Path) -> List[pathlib.Path]:
  return sorted(p for p in step_dir.rglob("*")
                if p.is_file() and p.name not in (DIGESTS, DIGESTS + ".tmp"))


def write_digests(step_dir) -> None:
  """Writes ``step_dir/SHA256SUMS``: the digest of every file below it.

  Written to a temporary name and renamed, so the record is either whole or
  absent.
  """
  step_dir = pathlib.Path(step_dir)
  lines = [f"{sha256(p)}  {p.relative_to(step_dir).as_posix()}\n"
           for p in _files(step_dir)]
  tmp = step_dir / (DIGESTS + ".tmp")
  with open(tmp, "w") as f:
    f.writelines(lines)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, step_dir / DIGESTS)


def verify_digests(step_dir) -> Optional[str]:
  """What is wrong with the files of a checkpoint (None: nothing).

  Returns a sentence naming the first missing or changed file, or saying
  that the record itself is missing (an interrupted save).
  """
  step_dir = pathlib.Path(step_dir)
  record = step_dir / DIGESTS
  if not record.is_file():
    return (f"it has no {DIGESTS} record ({record}): its save did not "
            "complete (interrupted), so it is treated as incomplete (a "
            "checkpoint written before records were kept has none either)")
  for line in record.read_text().splitlines():
    digest, sep, name = line.partition("  ")
    if not sep or len(digest) != 64:
      return f"its record {record} is unreadable (line {line!r})"
    path = step_dir / name
    if not path.is_file():
      return f"file {path} is missing"
    if sha256(path) != digest:
      return (f"file {path}: its SHA-256 is not the one recorded after the "
              f"save (the file was changed or truncated; {path.stat().st_size}"
              " bytes now)")
  return None


# ------------------------------------------------------------ state check --

def _key_name(key) -> Optional[str]:
  for attr in ("name", "key"):
    value = getattr(key, attr, None)
    if isinstance(value, str):
      return value
  return None


def _host_value(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_shards[0].data  # replicated: this process's copy
  return np.asarray(jax.device_get(x))


def check_state(state) -> Optional[str]:
  """What in a restored state cannot be (None: nothing).

  Non-finite values in any floating leaf, and negative values in a leaf
  under a field of :data:`NON_NEGATIVE_FIELDS`.

  Example:
    >>> import numpy as np, optax
    >>> state = optax.adam(0.1).init({"w": np.zeros(3, np.float32)})
    >>> check_state(state) is None
    True
    >>> bad = state[0]._replace(nu={"w": np.array([0., -1., 0.], np.float32)})
    >>> print(check_state((bad,) + state[1:]))
    leaf 0/nu/w: 1 negative value(s) (e.g. -1.0) in a field that cannot be negative
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      continue
    x = _host_value(leaf)
    name = blaq_jax.path_str(path)
    bad = ~np.isfinite(x)
    if bad.any():
      return (f"leaf {name}: {int(bad.sum())} non-finite value(s) (e.g. "
              f"{x[bad].flat[0]})")
    if any(_key_name(k) in NON_NEGATIVE_FIELDS for k in path):
      neg = x < 0
      if neg.any():
        return (f"leaf {name}: {int(neg.sum())} negative value(s) (e.g. "
                f"{x[neg].flat[0]}) in a field that cannot be negative")
  return None


# ---------------------------------------------------------------- orbax --

def _leaf_names(tree) -> List[str]:
  return [blaq_jax.path_str(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(tree)[0]]


def quiet_orbax_logging() -> None:
  """Drops orbax's per-save INFO lines (they bury the progress bar)."""
  import logging  # pylint: disable=g-import-not-at-top

  class _Filter(logging.Filter):

    def filter(self, record):
      return record.levelno > logging.INFO or "orbax" not in record.pathname

  for handler in logging.getLogger().handlers + logging.getLogger(
      "absl").handlers:
    handler.addFilter(_Filter())


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


class Checkpoints:
  """Orbax checkpoints of the train state (every leaf, in a list) + meta.

  The train state holds custom pytree nodes (quantized tensors, masked
  nodes); saving its leaves as a list and restoring them into the
  structure built from the config keeps orbax out of that. Every save is
  followed by its :data:`DIGESTS` record; see the module docstring.
  """

  def __init__(self, directory: str, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self.ocp = ocp
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep),
                                             create=True),
        item_names=("state", "meta"))

  def steps(self) -> List[int]:
    """The epochs with a checkpoint directory (finalised by orbax)."""
    if not self.directory.is_dir():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir()
                  if p.is_dir() and p.name.isdigit())

  def step_dir(self, epoch: int) -> pathlib.Path:
    return self.directory / str(epoch)

  def save(self, epoch: int, state, meta: Dict[str, Any]) -> None:
    """Saves, waits for orbax to finalise, then writes the digest record."""
    meta = dict(meta, leaf_names=_leaf_names(state),
                process_count=jax.process_count())
    self.manager.save(epoch, args=self.ocp.args.Composite(
        state=self.ocp.args.StandardSave({"leaves": jax.tree.leaves(state)}),
        meta=self.ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()
    _sync(f"checkpoint_{epoch}_saved")
    if jax.process_index() == 0:
      write_digests(self.step_dir(epoch))
    _sync(f"checkpoint_{epoch}_recorded")

  def restore(self, epoch: int, like, sharding):
    """``(state, meta)`` of one checkpoint, unchecked (see
    :meth:`restore_latest`). Raises :class:`ConfigMismatchError` if it was
    written by another process count or holds another state structure."""
    abstract = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x),
                                     sharding=sharding)
                for x in jax.tree.leaves(like)]
    meta = self.manager.restore(epoch, args=self.ocp.args.Composite(
        meta=self.ocp.args.JsonRestore()))["meta"]
    saved_procs = meta.get("process_count", 1)
    if saved_procs != jax.process_count():
      raise ConfigMismatchError(
          f"The checkpoint of epoch {epoch} in {self.directory} was written "
          f"by {saved_procs} process(es); this run has "
          f"{jax.process_count()}. Resume it with {saved_procs} process(es) "
          "(the input shards and the order of the cross-host reductions "
          "depend on the count, so the result would not be that of an "
          "uninterrupted run), or start a new --workdir.")
    names = _leaf_names(like)
    if meta.get("leaf_names") != names:
      raise ConfigMismatchError(
          f"The checkpoint of epoch {epoch} in {self.directory} does not "
          "have the structure this config builds (leaves differ); was it "
          "written by another version? Start a new --workdir.")
    restored = self.manager.restore(epoch, args=self.ocp.args.Composite(
        state=self.ocp.args.StandardRestore({"leaves": abstract})))
    leaves = restored["state"]["leaves"]
    return jax.tree.unflatten(jax.tree.structure(like), leaves), meta

  def _problem(self, epoch: int, like, sharding):
    """``(problem, state, meta)``: problem is None for a good checkpoint."""
    problem = verify_digests(self.step_dir(epoch))
    if problem is not None:
      return problem, None, None
    try:
      state, meta = self.restore(epoch, like, sharding)
    except ConfigMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      return f"orbax could not restore it ({type(e).__name__}: {first})", \
          None, None
    problem = check_state(state)
    if problem is not None:
      return f"its state holds what cannot be: {problem}", None, None
    return None, state, meta

  def restore_latest(self, like, sharding, *, move_damaged: bool = False
                     ) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
    """``(epoch, state, meta)`` of the newest good checkpoint (None: none).

    Newer checkpoints that are not good are named on stderr with the
    reason; with ``move_damaged`` (a run that will save again) they are
    moved to ``WORKDIR/checkpoints_damaged/``.

    Raises:
      CheckpointError: there are checkpoints but none is good.
      ConfigMismatchError: the newest readable checkpoint belongs to
        another configuration or process count.
    """
    bad: List[Tuple[int, str]] = []
    found = None
    for epoch in reversed(self.steps()):
      problem, state, meta = self._problem(epoch, like, sharding)
      if problem is None:
        found = (epoch, state, meta)
        break
      bad.append((epoch, problem))
    if found is None and bad:
      raise CheckpointError(
          "No usable checkpoint in " + str(self.directory) + ":\n  "
          + "\n  ".join(f"epoch {e} ({self.step_dir(e)}): {why}"
                        for e, why in bad)
          + "\nThe damaged files cannot be repaired here. Restore them from "
          "a backup, or move the damaged checkpoint directories out of "
          f"{self.directory} (e.g. mv {self.step_dir(bad[0][0])} "
          f"{self.directory.parent / DAMAGED_DIR}/) to train this workdir "
          "again from the start, or use a new --workdir.")
    for epoch, why in bad:
      where = self.step_dir(epoch)
      note = ""
      if move_damaged:
        target = self._damaged_target(epoch)
        note = f" Moved it to {target}."
        if jax.process_index() == 0:
          target.parent.mkdir(parents=True, exist_ok=True)
          shutil.move(str(where), str(target))
      _say(f"Checkpoint of epoch {epoch} ({where}) is not used: {why}. "
           f"Using the checkpoint of epoch {found[0]} instead.{note}")
    if bad and move_damaged:
      _sync("damaged_checkpoints_moved")
      self.manager.reload()
    return found

  def _damaged_target(self, epoch: int) -> pathlib.Path:
    root = self.directory.parent / DAMAGED_DIR
    target, n = root / str(epoch), 1
    while target.exists():
      target, n = root / f"{epoch}.{n}", n + 1
    return target

  def close(self):
    self.manager.close()


# --------------------------------------------------------- config guard --

def json_config(config) -> Dict[str, Any]:
  """The config as plain JSON types (tuples become lists)."""
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(cfg, default=list))


def _flatten(d: Mapping, prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_differences(saved: Mapping, current: Mapping, *,
                       fixed_length: bool = False) -> List[str]:
  """The fields (dotted names) where two JSON configs differ.

  Fields of :data:`RUN_CONTROL_FIELDS` are ignored, and so is ``num_epochs``
  when the method is the same and its schedule does not span the run
  (``fixed_length=False``: a run may be extended).

  Examples:
    >>> config_differences({"method": "laq", "bits": 1, "seed": 0},
    ...                    {"method": "blaq", "bits": 1, "seed": 0})
    ["method: 'laq' (saved) vs 'blaq' (now)"]
  """
  a, b = _flatten(saved), _flatten(current)
  ignored = set(RUN_CONTROL_FIELDS)
  if a.get("method") == b.get("method") and not fixed_length:
    ignored.add("num_epochs")
  out = []
  for key in sorted(set(a) | set(b)):
    if key.split(".")[0] in ignored:
      continue
    va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
    if va != vb:
      out.append(f"{key}: {va!r} (saved) vs {vb!r} (now)")
  return out


def check_workdir_config(workdir: str, config, *,
                         fixed_length: bool = False) -> None:
  """Raises :class:`ConfigMismatchError` if ``workdir`` holds another run."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    ckpts = pathlib.Path(workdir) / "checkpoints"
    if ckpts.exists() and any(ckpts.iterdir()):
      raise ConfigMismatchError(
          f"{workdir} holds checkpoints but no config.json: refusing to "
          "resume a run of unknown configuration. Use another --workdir.")
    return
  saved = json.loads(path.read_text())
  diff = config_differences(saved, json_config(config),
                            fixed_length=fixed_length)
  if diff:
    raise ConfigMismatchError(
        f"--workdir {workdir} holds a run with another configuration; it "
        "was not resumed and nothing in it was changed. Differing fields:\n  "
        + "\n  ".join(diff) + "\nUse a new --workdir, or the saved values "
        f"(see {path}) to resume it.")


def write_config(workdir: str, config) -> None:
  """Writes ``config.json`` of a new run, or an extended run's num_epochs."""
  path = pathlib.Path(workdir) / "config.json"
  saved = json.loads(path.read_text()) if path.exists() else None
  if saved is None:
    saved = json_config(config)
  elif saved.get("num_epochs") == config.num_epochs:
    return
  saved["num_epochs"] = config.num_epochs
  path.write_text(json.dumps(saved, indent=2, sort_keys=True))


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The configuration saved in ``workdir/config.json``."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"No config.json in {workdir}: pass --config "
                            "or a workdir written by experiments.train.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))
