"""Checkpoints that cannot be misread (experiments.checkpointing).

Each damage is done to the newest checkpoint of a real 2-epoch run (narrow
MLP, MNIST subset): the run must name it, use the good one of epoch 1, and,
when training resumes, train epoch 2 again to the same state as the
undamaged run.
"""

import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import checkpointing
from experiments import metrics as metrics_lib
from experiments import train as train_lib
from experiments.configs import quick


def tiny_config(data_dir):
  c = quick.get_config()
  c.data_dir = str(data_dir)
  c.model_options.hidden = (16,)
  c.method = "blaq"
  c.blaq_period_epochs = 2
  c.train_size, c.validation_size, c.test_size = 300, 0, 200
  c.num_epochs = 2
  c.num_devices = 1
  c.keep_checkpoints = 3
  c.progress_bar = c.write_plots = c.tensorboard = False
  c.num_tracked = 4
  return c


@pytest.fixture(scope="module")
def finished_run(shared_data_dir, tmp_path_factory):
  """A finished 2-epoch run and its final state (read-only: copy it)."""
  workdir = tmp_path_factory.mktemp("run") / "w"
  config = tiny_config(shared_data_dir)
  train_lib.train_and_evaluate(config, str(workdir))
  _, state, meta = train_lib.restore_latest(str(workdir), config)
  assert meta["epoch"] == 2
  return workdir, jax.device_get(state)


@pytest.fixture
def run_copy(finished_run, tmp_path):
  workdir, _ = finished_run
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  return copy


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in step_dir.rglob("*")
           if p.is_file() and p.name != checkpointing.DIGESTS]
  return max(files, key=lambda p: p.stat().st_size)


def _resume_uses_epoch_1(workdir, config, finished_state, capsys, why):
  """Resumes the damaged run: epoch 2 is named, epoch 1 used, epoch 2 is
  trained again to the undamaged run's state."""
  capsys.readouterr()
  summary = train_lib.train_and_evaluate(config, str(workdir))
  err = capsys.readouterr()
  bad = workdir / "checkpoints" / "2"
  assert f"Checkpoint of epoch 2 ({bad}) is not used: " in err.err, err.err
  assert why in err.err, err.err
  assert "Using the checkpoint of epoch 1 instead." in err.err
  assert "resuming from epoch 1 of 2" in err.out
  moved = workdir / checkpointing.DAMAGED_DIR / "2"
  assert moved.is_dir() and f"Moved it to {moved}" in err.err
  assert summary["epochs"] == 2
  _, state, meta = train_lib.restore_latest(str(workdir), config)
  assert meta["epoch"] == 2
  chex.assert_trees_all_equal(jax.device_get(state), finished_state)


def test_digest_record_lists_every_file(finished_run):
  workdir, _ = finished_run
  for epoch in (1, 2):
    step = workdir / "checkpoints" / str(epoch)
    record = (step / checkpointing.DIGESTS).read_text().splitlines()
    files = sorted(p.relative_to(step).as_posix() for p in step.rglob("*")
                   if p.is_file() and p.name != checkpointing.DIGESTS)
    assert sorted(line.split("  ", 1)[1] for line in record) == files
    assert checkpointing.verify_digests(step) is None  # epoch 1 after 2's save


def test_flipped_byte_is_detected(shared_data_dir, finished_run, run_copy,
                                  capsys):
  target = _largest_file(run_copy / "checkpoints" / "2")
  raw = bytearray(target.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  target.write_bytes(bytes(raw))
  _resume_uses_epoch_1(run_copy, tiny_config(shared_data_dir),
                       finished_run[1], capsys,
                       f"file {target}: its SHA-256 is not the one recorded")


def test_truncated_file_is_detected(shared_data_dir, finished_run, run_copy,
                                    capsys):
  target = _largest_file(run_copy / "checkpoints" / "2")
  size = target.stat().st_size
  with open(target, "r+b") as f:
    f.truncate(size // 2)
  _resume_uses_epoch_1(run_copy, tiny_config(shared_data_dir),
                       finished_run[1], capsys,
                       f"file {target}: its SHA-256 is not the one recorded "
                       f"after the save (the file was changed or truncated; "
                       f"{size // 2} bytes now)")


def test_missing_file_is_detected(shared_data_dir, finished_run, run_copy,
                                  capsys):
  target = _largest_file(run_copy / "checkpoints" / "2")
  target.unlink()
  _resume_uses_epoch_1(run_copy, tiny_config(shared_data_dir),
                       finished_run[1], capsys, f"file {target} is missing")


def test_interrupted_save_without_record_is_incomplete(
    shared_data_dir, finished_run, run_copy, capsys):
  # Killed after orbax finalised the save and before the record was written.
  (run_copy / "checkpoints" / "2" / checkpointing.DIGESTS).unlink()
  _resume_uses_epoch_1(run_copy, tiny_config(shared_data_dir),
                       finished_run[1], capsys,
                       "its save did not complete (interrupted), so it is "
                       "treated as incomplete")


def test_eval_falls_back_without_moving_anything(shared_data_dir, run_copy,
                                                 capsys):
  config = tiny_config(shared_data_dir)
  good = train_lib.evaluate_workdir(str(run_copy), config)
  step2 = run_copy / "checkpoints" / "2"
  (step2 / checkpointing.DIGESTS).unlink()
  capsys.readouterr()
  older = train_lib.evaluate_workdir(str(run_copy), config)
  err = capsys.readouterr().err
  assert f"Checkpoint of epoch 2 ({step2}) is not used" in err
  assert "Using the checkpoint of epoch 1 instead." in err
  assert step2.is_dir() and not (run_copy /
                                 checkpointing.DAMAGED_DIR).exists()
  epochs = metrics_lib.read_jsonl(run_copy / "metrics" / "epochs.jsonl")
  assert older["test_accuracy"] == epochs[0]["test_accuracy"]
  assert good["test_accuracy"] == epochs[1]["test_accuracy"]


def test_no_good_checkpoint_stops_naming_the_file(shared_data_dir, run_copy):
  damaged = []
  for epoch in (1, 2):
    target = _largest_file(run_copy / "checkpoints" / str(epoch))
    with open(target, "r+b") as f:
      f.truncate(1)
    damaged.append(target)
  before = {p: p.stat().st_mtime_ns for p in run_copy.rglob("*")}
  with pytest.raises(checkpointing.CheckpointError) as err:
    train_lib.train_and_evaluate(tiny_config(shared_data_dir), str(run_copy))
  message = str(err.value)
  for target in damaged:
    assert f"file {target}: its SHA-256 is not the one recorded" in message
  assert "Restore them from a backup, or move the damaged checkpoint" in (
      message)
  assert f"mv {run_copy / 'checkpoints' / '2'}" in message
  # Nothing was moved or rewritten.
  assert {p: p.stat().st_mtime_ns for p in run_copy.rglob("*")} == before


# ---------------------------------------- the restored state's contents --

def _adam_train_state(nu_value):
  params = {"w": jnp.ones((3,), jnp.float32)}
  opt_state = optax.adam(0.1).init(params)
  adam = opt_state[0]._replace(nu={"w": jnp.full((3,), nu_value)})
  return {"params": params, "opt_state": (adam,) + tuple(opt_state[1:])}


@pytest.mark.parametrize("bad,why", [
    (-1.0, "leaf opt_state/0/nu/w: 3 negative value(s) (e.g. -1.0) in a "
     "field that cannot be negative"),
    (np.nan, "leaf opt_state/0/nu/w: 3 non-finite value(s) (e.g. nan)")])
def test_state_that_cannot_be_is_not_used(tmp_path, capsys, bad, why):
  # A checkpoint whose files are intact (digests match) but whose state
  # cannot be: Adam's second moments negative or NaN.
  ckpt = checkpointing.Checkpoints(str(tmp_path / "checkpoints"), keep=3)
  meta = dict(epoch=0)
  ckpt.save(1, _adam_train_state(0.5), dict(meta, epoch=1))
  ckpt.save(2, _adam_train_state(bad), dict(meta, epoch=2))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  epoch, state, saved = ckpt.restore_latest(_adam_train_state(0.0), sharding)
  ckpt.close()
  assert epoch == 1 and saved["epoch"] == 1
  np.testing.assert_array_equal(state["opt_state"][0].nu["w"], 0.5)
  err = capsys.readouterr().err
  assert f"its state holds what cannot be: {why}" in err, err


def test_check_state_names_negative_quantization_scale():
  import blaq_jax  # pylint: disable=g-import-not-at-top
  params = {"dense": {"kernel": jnp.full((2, 2), 0.3)}}
  state = blaq_jax.laq(0.1).init(params)
  assert checkpointing.check_state(state) is None
  scales = blaq_jax.scales(state)
  assert float(scales["dense"]["kernel"]) > 0
  flipped = jax.tree_util.tree_map_with_path(
      lambda path, x: -x if any(getattr(k, "name", None) == "alpha"
                                for k in path) else x, state)
  assert "alpha: 1 negative value(s)" in checkpointing.check_state(flipped)
