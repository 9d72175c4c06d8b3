"""3D structures with predicted energies from a trained consist model.

  python -m launch.predict --checkpoint WORKDIR --smiles CCO --smiles c1ccccc1 --out pred.sdf
  python -m launch.predict --input mols.smi|mols.sdf|mols.xyz --out pred.xyz --mode ddim --samples 4
  python -m launch.predict --input mmff.sdf --out refined.sdf --mode refine --relax

--checkpoint defaults to the bundled pretrained model (models/pretrained). Refine mode starts from
the input's coordinates (.sdf / .xyz) or builds a seeded ETKDG + MMFF94 structure; --relax polishes
every structure on the learned energy (batched BFGS). Molecules that cannot be
predicted (unparsable, an element the model never saw, larger than every shape bucket, embedding
failure) are listed with their reason at the end; the exit status is non-zero only if nothing was predicted. The output file
is written atomically, and not at all if nothing was predicted.
"""

import sys

from absl import app, flags, logging

from launch import _cli
from launch import _sampling_flags as sf

_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Workdir of a launch.train run (default: the bundled models/pretrained).")
_SMILES = flags.DEFINE_multi_string("smiles", None, "A SMILES to predict (repeatable).")
_INPUT = flags.DEFINE_string("input", None, "Input file: .smi (SMILES [name] per line), .sdf or .xyz (extended).")
_OUT = flags.DEFINE_string("out", None, "Output file: .sdf (bond graph kept) or .xyz (extended XYZ).")
_RELAX = flags.DEFINE_bool("relax", False, "Relax each structure on the learned energy (batched "
                           "BFGS).")
_FMAX = flags.DEFINE_float("fmax", 0.05, "--relax threshold: max atomic force, eV/Å.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of embeddings and sampling.")
flags.adopt_module_key_flags(sf)  # --help lists the shared sampling flags too
flags.mark_flag_as_required("out")


PROG = "launch.predict"


def _fail(flag: str, value, message: str) -> None:
  _cli.fail(PROG, f"--{flag}={value}: {message}")


def _check_sampling_flags() -> None:
  """The sampling flags, named as the user typed them (before the model is loaded)."""
  if sf.T_STAR.value is not None and not 0.0 < sf.T_STAR.value <= 1.0:
    _fail("t_star", sf.T_STAR.value, "must lie in (0, 1] (the noise level, as a fraction of the diffusion "
          "time, the start structure is taken to in refine mode; e.g. 0.1)")
  for flag in (sf.SAMPLES, sf.RELAX_STEPS):
    if flag.value < 1:
      _fail(flag.name, flag.value, "must be >= 1")
  if sf.ETA.value is not None and not 0.0 <= sf.ETA.value <= 1.0:
    _fail("eta", sf.ETA.value, "must lie in [0, 1] (0: deterministic DDIM, 1: ancestral sampling)")
  if sf.NOISE_SCALE.value is not None and not 0.0 <= sf.NOISE_SCALE.value <= 1.0:
    _fail("noise_scale", sf.NOISE_SCALE.value, "must lie in [0, 1] (1: the learned distribution)")
  if sf.CANDIDATES.value < 0:
    _fail("candidates", sf.CANDIDATES.value, "must be >= 1 (or 0: the mode's default)")
  if sf.CANDIDATES.value > 1 and sf.MODE.value == "refine":
    _fail("candidates", sf.CANDIDATES.value, "refine is deterministic; candidates apply to --mode ddim "
          "or denoise")
  if sf.STEPS.value < 0:
    _fail("steps", sf.STEPS.value, "must be >= 1 (or 0: the mode's default)")
  if _FMAX.value <= 0:
    _fail("fmax", _FMAX.value, "must be positive (eV/Å)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_SMILES.value) == bool(_INPUT.value):
    raise app.UsageError("give either --smiles (repeatable) or --input FILE")
  _check_sampling_flags()
  from consist import inference  # pylint: disable=g-import-not-at-top  (imports jax)
  from consist.data.bundled import PRETRAINED_MODEL  # pylint: disable=g-import-not-at-top
  from consist.predict import molecules, run, writers  # pylint: disable=g-import-not-at-top

  try:
    sampling = inference.Sampling(mode=sf.MODE.value, samples=sf.SAMPLES.value, steps=sf.STEPS.value,
                                  eta=sf.ETA.value, noise_scale=sf.NOISE_SCALE.value,
                                  candidates=sf.CANDIDATES.value, t_star=sf.T_STAR.value,
                                  noise=sf.NOISE.value, level=sf.STRUCTURE_LEVEL.value, seed=_SEED.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  try:
    writers.check_output_path(_OUT.value)
  except writers.OutputPathError as e:
    _fail("out", _OUT.value, str(e))
  if _INPUT.value:
    try:
      inputs = molecules.read_input(_INPUT.value)
    except molecules.InputFileError as e:
      _fail("input", _INPUT.value, str(e))
  else:
    inputs = molecules.read_smiles(_SMILES.value)
  if not inputs:
    _cli.fail(PROG, f"--input={_INPUT.value}: no molecules in this file (one SMILES per line, # comments); "
              "nothing to predict", exit_code=1)
  try:
    model = inference.load_model(_CHECKPOINT.value)
  except inference.CheckpointError as e:
    _fail("checkpoint", _CHECKPOINT.value or PRETRAINED_MODEL, str(e))
  try:
    model.resolve(sampling)
  except ValueError as e:
    _fail("structure_level", sf.STRUCTURE_LEVEL.value, str(e))
  report = run.predict_to_file(model, inputs, _OUT.value, sampling, relax=_RELAX.value, fmax=_FMAX.value,
                               relax_steps=sf.RELAX_STEPS.value)
  print(report.summary(), flush=True)
  if not report.structures:
    sys.exit("launch.predict: no molecule could be predicted; no output written")


if __name__ == "__main__":
  _cli.run(main, PROG, log_level=logging.ERROR)
