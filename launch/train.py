"""Trains one stage of a consist run.

  python -m launch.train --config configs/smoke.py --workdir /tmp/smoke [--config.train.steps=100]

Multi-host (every host runs the same command): `--jax_distributed` or CONSIST_JAX_DISTRIBUTED=1
calls `jax.distributed.initialize()` (no arguments on TPU pods / Slurm / Open MPI; on CPU pass
--coordinator_address, --num_processes, --process_id, which also selects gloo collectives).
"""

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory (checkpoints, logs); resumed if it holds a checkpoint.")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", os.environ.get("CONSIST_JAX_DISTRIBUTED", "0") == "1",
                                 "Call jax.distributed.initialize() (default from CONSIST_JAX_DISTRIBUTED=1).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (CPU multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (CPU multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (CPU multi-process).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 shows it
  from consist.train import train_and_evaluate

  summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print("summary " + json.dumps(summary), flush=True)


if __name__ == "__main__":
  app.run(main)
