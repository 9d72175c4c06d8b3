"""Trains one stage of a consist run.

  python -m launch.train --config configs/smoke.py --workdir /tmp/smoke [--config.train.steps=100]

Multi-host (every host runs the same command): `--jax_distributed` or CONSIST_JAX_DISTRIBUTED=1
calls `jax.distributed.initialize()` (no arguments on TPU pods / Slurm / Open MPI; on CPU pass
--coordinator_address, --num_processes, --process_id, which also selects gloo collectives).
"""

import json
import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from launch import _cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory (checkpoints, logs); resumed if it holds a checkpoint.")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", os.environ.get("CONSIST_JAX_DISTRIBUTED", "0") == "1",
                                 "Call jax.distributed.initialize() (default from CONSIST_JAX_DISTRIBUTED=1).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (CPU multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (CPU multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (CPU multi-process).")
flags.mark_flags_as_required(["config", "workdir"])


PROG = "launch.train"


def _check_paths(workdir: Path, data_path: str) -> None:
  """The mistakes that would otherwise surface deep inside orbax or the store reader."""
  if workdir.exists() and not workdir.is_dir():
    raise _cli.UserError(f"--workdir={workdir}: is a file, not a directory; give a new or existing run directory")
  if not data_path:
    raise _cli.UserError("--config.data.path: no dataset given; set it to a dataset directory "
                         "(written by launch.convert or launch.build_dataset)")
  data = Path(data_path)
  if not data.exists():
    raise _cli.UserError(f"--config.data.path={data_path}: no such dataset directory")
  if not data.is_dir():
    raise _cli.UserError(f"--config.data.path={data_path}: is a file; a dataset is a directory "
                         "(written by launch.convert or launch.build_dataset)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _check_paths(Path(_WORKDIR.value), _CONFIG.value.get("data", {}).get("path", ""))
  import jax  # after flag parsing, so --jax_* flags apply

  if _DISTRIBUTED.value:
    kwargs = {}
    if _COORDINATOR.value:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      kwargs = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                    process_id=_PROCESS_ID.value)
    jax.distributed.initialize(**kwargs)
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.default_backend())
  from consist import checkpoint  # pylint: disable=g-import-not-at-top
  from consist.config import ConfigError  # pylint: disable=g-import-not-at-top
  from consist.data.store import StoreError  # pylint: disable=g-import-not-at-top
  from consist.train import DatasetLabelError, NonFiniteError, train_and_evaluate  # pylint: disable=g-import-not-at-top

  try:
    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    raise _cli.UserError(_cli.config_error_message(str(e), sys.argv)) from None
  except StoreError as e:
    raise _cli.UserError(f"--config.data.path={_CONFIG.value.data.path}: {e}", exit_code=1) from None
  except (DatasetLabelError, checkpoint.CheckpointMismatchError, NonFiniteError) as e:
    raise _cli.UserError(str(e), exit_code=1) from None
  except KeyboardInterrupt:  # before the step loop (which saves and returns on SIGINT)
    raise _cli.UserError("interrupted before training started; nothing was saved",
                         exit_code=_cli.EXIT_INTERRUPTED) from None
  if jax.process_index() == 0:
    print("summary " + json.dumps(summary), flush=True)
  if summary.get("interrupted"):
    sys.exit(_cli.EXIT_INTERRUPTED)


if __name__ == "__main__":
  _cli.run(main, PROG, log_level=logging.WARNING)
