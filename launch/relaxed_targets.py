"""Writes a dataset whose equilibrium records carry the minima of a run's learned energy as
references: the targets of stage-2 training with `--config.loss.optimality_form=relaxed`.

  python -m launch.relaxed_targets --model models/structure_stage1 --data data/bundled \
      --splits train,val --out runs/relaxed_data

Each equilibrium record is relaxed from its own structure on the run's energy model (batched BFGS,
`consist.relax`) to --fmax eV/Å; see `consist.relaxed_targets`. The source
dataset is not modified; an existing complete --out is reused, not overwritten.
"""

import sys
import time
from pathlib import Path

from absl import app, flags, logging

from launch import _cli

_MODEL = flags.DEFINE_string("model", None, "Run directory of launch.train whose energy model is relaxed on.")
_DATA = flags.DEFINE_string("data", None, "Source dataset directory.")
_SPLITS = flags.DEFINE_list("splits", ["train", "val"], "Splits to write.")
_OUT = flags.DEFINE_string("out", None, "Output dataset directory.")
_FMAX = flags.DEFINE_float("fmax", 0.05, "Convergence threshold on the max atomic force, eV/Å.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 500, "Step limit per molecule (unconverged ones get no target).")
flags.mark_flags_as_required(["model", "data", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from consist import relax  # after flag parsing: imports jax
  from consist.data.store import open_dataset
  from consist.eval.run import Progress
  from consist.inference import CheckpointError, load_model
  from consist.relaxed_targets import write_relaxed_targets
  from consist.reproduce import energy_model_fingerprint

  if _FMAX.value <= 0:
    raise app.UsageError(f"--fmax={_FMAX.value}: must be > 0 (eV/Å)")
  if _MAX_STEPS.value < 1:
    raise app.UsageError(f"--max_steps={_MAX_STEPS.value}: must be >= 1")
  settings = relax.RelaxSettings(fmax=_FMAX.value, max_steps=_MAX_STEPS.value)
  try:
    splits = open_dataset(_DATA.value).splits
  except (ValueError, OSError) as e:
    raise _cli.UserError(f"--data={_DATA.value}: {e}") from e
  missing = [s for s in _SPLITS.value if s not in splits]
  if missing:
    raise _cli.UserError(f"--splits: {_DATA.value} has no split(s) {missing} (splits: {sorted(splits)})")
  out = Path(_OUT.value)
  if out.exists() and out.resolve() == Path(_DATA.value).resolve():
    raise _cli.UserError(f"--out={out}: is --data; the source is never modified, give a new path")
  if out.exists() and not (out / "dataset.json").exists():
    raise _cli.UserError(f"--out={out}: exists and is not a dataset; give a new path")
  if (out / "dataset.json").exists():
    print(f"{out}: exists, reused (delete it to write it again)", file=sys.stderr)
    return
  try:
    model = load_model(_MODEL.value)
  except CheckpointError as e:
    raise _cli.UserError(f"--model: {e}") from e
  t0 = time.perf_counter()
  write_relaxed_targets(model, _DATA.value, out, _SPLITS.value, settings,
                        fingerprint=energy_model_fingerprint(model.params),
                        progress_for=lambda split: Progress(f"relaxing {split}"))
  print(f"{out} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
  _cli.run(main, "launch.relaxed_targets", log_level=logging.ERROR)
