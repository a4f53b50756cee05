"""The command line (experiments.main; ``python -m experiments.train`` runs it).

What cannot be meant is refused before anything is written, a resumed run
says so, hints name real flags, and the progress bar is drawn only on a
terminal.
"""

import io
import os
import pathlib
import re
import subprocess
import sys

import pytest

from experiments import metrics as metrics_lib
from experiments import train as train_lib
from experiments.configs import quick

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_dir, **overrides):
  c = quick.get_config()
  c.data_dir = str(data_dir)
  c.model_options.hidden = (16,)
  c.train_size, c.validation_size, c.test_size = 200, 0, 100
  c.num_epochs = 1
  c.num_devices = 1
  c.progress_bar = c.write_plots = c.tensorboard = False
  c.num_tracked = 0
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _cli(*args, timeout=300):
  return subprocess.run(
      [sys.executable, "-m", "experiments.train", *args], cwd=REPO,
      env=_env(), capture_output=True, text=True, timeout=timeout)


# One refused value per case: (field, value, the message).
REFUSED = [
    ("learning_rate", 0.0, "--config.learning_rate=0.0 must be > 0."),
    ("learning_rate", -0.005, "--config.learning_rate=-0.005 must be > 0."),
    ("num_epochs", 0, "--config.num_epochs=0 must be >= 1."),
    ("batch_size", 0, "--config.batch_size=0 must be >= 1."),
    ("batch_size", -100, "--config.batch_size=-100 must be >= 1."),
    ("a", 1.5, "--config.a=1.5 (BLAQ's blend weight) must be in [0, 1]."),
    ("a", -0.1, "--config.a=-0.1 (BLAQ's blend weight) must be in [0, 1]."),
    ("lr_decay_rate", 0.0, "--config.lr_decay_rate=0.0 must be in (0, 1]."),
    ("lr_decay_rate", 2.0, "--config.lr_decay_rate=2.0 must be in (0, 1]."),
    ("lr_decay_every_epochs", 0,
     "--config.lr_decay_every_epochs=0 must be >= 1."),
    ("eval_batch_size", 0, "--config.eval_batch_size=0 must be >= 1."),
    ("blaq_period_epochs", 0, "--config.blaq_period_epochs=0 must be >= 1."),
    ("bits", 0, "--config.bits=0 must be >= 1."),
    ("train_size", -1,
     "--config.train_size=-1 must be >= 0 (0: the whole split)."),
    ("clip_latent", -1.0,
     "--config.clip_latent=-1.0 must be >= 0 (0: no clipping)."),
    ("keep_checkpoints", 0, "--config.keep_checkpoints=0 must be >= 1."),
    ("log_every_steps", 0, "--config.log_every_steps=0 must be >= 1."),
    ("fogzo.n", 0, "--config.fogzo.n=0 must be >= 1."),
    ("fogzo.beta_min", 1.5, "--config.fogzo.beta_min=1.5 must be in [0, 1]."),
    ("method", "nope", "--config.method='nope' is not a method"),
    ("loss", "nope", "--config.loss='nope' is not a loss"),
]


@pytest.mark.parametrize("field,value,message", REFUSED,
                         ids=[f"{f}={v}" for f, v, _ in REFUSED])
def test_value_that_cannot_be_meant_is_refused_before_writing(
    shared_data_dir, tmp_path, field, value, message):
  config = tiny_config(shared_data_dir)
  *parents, last = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[last] = value
  workdir = tmp_path / "run"
  with pytest.raises(train_lib.ConfigError, match=re.escape(message)):
    train_lib.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_bits_the_method_cannot_have_is_refused_before_writing(
    shared_data_dir, tmp_path):
  config = tiny_config(shared_data_dir, method="twn", bits=1)
  with pytest.raises(train_lib.ConfigError,
                     match=re.escape("set --config.bits=2 (got 1)")):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_cli_refusal_is_one_message_without_traceback(shared_data_dir,
                                                      tmp_path):
  workdir = tmp_path / "run"
  out = _cli("--config", str(REPO / "experiments/configs/quick.py"),
             "--workdir", str(workdir), f"--config.data_dir={shared_data_dir}",
             "--config.learning_rate=-0.1")
  assert out.returncode == 1
  assert "error: --config.learning_rate=-0.1 must be > 0." in out.stderr
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  assert not workdir.exists()


def test_resumed_run_says_from_which_epoch(shared_data_dir, tmp_path, capsys):
  config = tiny_config(shared_data_dir, method="laq")
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert "resuming" not in capsys.readouterr().out
  config.num_epochs = 2
  train_lib.train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  assert (f"resuming from epoch 1 of 2 ({tmp_path / 'checkpoints' / '1'})"
          in out), out
  assert "epoch 2, loss" in out


def test_missing_data_hint_names_real_flags(tmp_path):
  empty = tmp_path / "no_data"
  empty.mkdir()
  config = tiny_config(empty)
  with pytest.raises(FileNotFoundError) as err:
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(err.value)
  assert "--config.data_dir" in message and "$BLAQ_DATA_DIR" in message
  assert re.search(r"(?<!config\.)--data_dir", message) is None, message
  assert not (tmp_path / "run").exists()


def test_progress_bar_only_on_a_terminal():
  class Terminal(io.StringIO):

    def isatty(self):
      return True

  assert metrics_lib.progress_bar(10, "epoch 1/1", True,
                                  stream=io.StringIO()) is None
  assert metrics_lib.progress_bar(10, "epoch 1/1", False,
                                  stream=Terminal()) is None
  terminal = Terminal()
  bar = metrics_lib.progress_bar(10, "epoch 1/1", True, stream=terminal)
  bar.update(10)
  bar.close()
  assert "epoch 1/1" in terminal.getvalue() and "10/10" in terminal.getvalue()


def test_piped_output_has_one_line_per_epoch_and_no_bar(shared_data_dir,
                                                        tmp_path):
  out = _cli("--config", str(REPO / "experiments/configs/quick.py"),
             "--workdir", str(tmp_path / "run"),
             f"--config.data_dir={shared_data_dir}",
             "--config.model_options.hidden=(16,)",
             "--config.train_size=200", "--config.test_size=100",
             "--config.validation_size=0", "--config.num_epochs=2",
             "--config.method=laq", "--config.progress_bar=True",
             "--config.write_plots=False", "--config.tensorboard=False")
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [l for l in out.stdout.splitlines() if l.startswith("epoch ")]
  assert [l.split(",")[0] for l in lines] == ["epoch 1", "epoch 2"]
  for stream in (out.stdout, out.stderr):
    assert "\r" not in stream and "it/s" not in stream


def test_unknown_command_is_refused(tmp_path):
  out = _cli("evaluate", "--workdir", str(tmp_path), timeout=120)
  assert out.returncode != 0
  assert "Unknown command 'evaluate': use train (default), eval or export" in (
      out.stderr)
