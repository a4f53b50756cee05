r"""Command line of the training application: flags and the three commands.

::

  python -m experiments.main --config experiments/configs/mnist_mlp.py \
      --workdir runs/mlp_blaq --config.method=blaq     # train (or resume)
  python -m experiments.main eval --workdir runs/mlp_blaq
  python -m experiments.main eval --workdir runs/mlp_blaq \
      --from_export runs/mlp_blaq/export/model.safetensors
  python -m experiments.main export --workdir runs/mlp_blaq

``python -m experiments.train ...`` runs the same commands. Every field of
the config file can be overridden with ``--config.<field>=value``; ``eval``
and ``export`` read the config saved in the workdir unless ``--config`` is
given. A config value that cannot be meant (a learning rate <= 0, fewer than
1 epoch, ...) is refused with a message naming its ``--config.<field>``
before anything is written. Multi-host: ``--jax_distributed`` (one process
per host; see :mod:`experiments.train`).
"""

from __future__ import annotations

import json
from typing import Sequence

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import checkpointing
from experiments import train as train_lib

FLAGS = flags.FLAGS
COMMANDS = ("train", "eval", "export")
# Errors whose message says what to do: shown without a traceback.
USER_ERRORS = (train_lib.ConfigError, checkpointing.ConfigMismatchError,
               checkpointing.CheckpointError, FileNotFoundError)


def define_flags() -> None:
  """Defines the application's flags (once per process)."""
  config_flags.DEFINE_config_file(
      "config", None, "Training configuration file (experiments/configs/).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory of the run.")
  flags.DEFINE_string("export_path", None,
                      "export: output file (default workdir/export/"
                      "model.safetensors).")
  flags.DEFINE_string("from_export", None,
                      "eval: evaluate this blaq_jax export instead of the "
                      "latest checkpoint.")
  flags.DEFINE_bool("jax_distributed", False,
                    "Call jax.distributed.initialize() first (multi-host: "
                    "one process per host).")
  flags.DEFINE_string("coordinator_address", None,
                      "With --jax_distributed: host:port of process 0.")
  flags.DEFINE_integer("num_processes", None,
                       "With --jax_distributed: number of processes.")
  flags.DEFINE_integer("process_id", None,
                       "With --jax_distributed: this process's index.")
  flags.mark_flags_as_required(["workdir"])


def run_command(command: str, workdir: str, config, *, export_path=None,
                from_export=None):
  """Runs ``train``, ``eval`` or ``export``; returns what it prints."""
  if config is None:
    if command == "train":
      raise train_lib.ConfigError(
          "train needs --config (e.g. --config experiments/configs/"
          "quick.py).")
    config = checkpointing.load_workdir_config(workdir)
  if command == "train":
    return train_lib.train_and_evaluate(config, workdir)
  if command == "export":
    return {"export": train_lib.export_checkpoint(
        workdir, config, export_path, print_summary=True)}
  return train_lib.evaluate_workdir(workdir, config, from_export)


def main(argv: Sequence[str]) -> None:
  checkpointing.quiet_orbax_logging()
  commands = list(argv[1:])
  command = commands[0] if commands else "train"
  if command not in COMMANDS or len(commands) > 1:
    raise app.UsageError(f"Unknown command {' '.join(commands)!r}: use "
                         "train (default), eval or export.")
  if FLAGS.jax_distributed:
    # With no flags, the coordinator, process count and id come from the
    # cluster environment (TPU pods, SLURM, ...); the flags set them by hand,
    # e.g. several processes on one machine.
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  try:
    result = run_command(command, FLAGS.workdir, FLAGS.config,
                         export_path=FLAGS.export_path,
                         from_export=FLAGS.from_export)
  except USER_ERRORS as e:
    raise SystemExit(f"error: {e}") from e
  if jax.process_index() == 0:
    print(json.dumps(result, indent=2))


def run() -> None:
  """Defines the flags and runs :func:`main` (the console entry)."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
