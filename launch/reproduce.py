"""The reproduction experiment: stage 1, four stage-2 arms per seed, evaluation, report.

  python -m launch.reproduce --config configs/reproduce_quickstart.py --workdir runs/repro_qs [--seeds 3]

Re-running the command resumes: finished runs and evaluations are skipped (`consist.reproduce`).
Writes <workdir>/results/{results.md, summary.json, results.json, *.png} and prints one short table
(mode x arm: mean RMSD, accurate energy gap, valid fraction) with the paths.
"""

import json
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from launch import _cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Reproduction config (configs/reproduce_*.py).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory (runs, evaluations, results).")
_SEEDS = flags.DEFINE_integer("seeds", None, "Number of seeds (overrides reproduce.seeds).")
_CACHE = flags.DEFINE_bool("compilation_cache", True,
                           "Persistent JAX compilation cache in <workdir>/jax_cache (runs of other seeds "
                           "reuse the compiled steps).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # after flag parsing

  config = _CONFIG.value
  if _SEEDS.value is not None:
    config.reproduce.seeds = _SEEDS.value
  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", str(Path(_WORKDIR.value) / "jax_cache"))
  from consist.reproduce import Reproduction, ReproduceError, ReproduceStopped

  command = "python -m launch.reproduce " + " ".join(sys.argv[1:])
  try:
    written = Reproduction(config, _WORKDIR.value).run(meta={"command": command})
  except ReproduceError as e:
    sys.exit(f"launch.reproduce: {e}")
  except ReproduceStopped as e:
    print(f"launch.reproduce: {e}", file=sys.stderr)
    sys.exit(_cli.EXIT_INTERRUPTED if e.interrupted else 0)
  from consist.eval import report  # pylint: disable=g-import-not-at-top
  results = Path(_WORKDIR.value) / "results"
  print(report.short_table(json.loads((results / "summary.json").read_text())["modes"]))
  print(f"full tables: {results / 'results.md'}; plots: "
        + ", ".join(str(p) for p in written if p.suffix == ".png"))


if __name__ == "__main__":
  _cli.run(main, "launch.reproduce", log_level=logging.ERROR)
