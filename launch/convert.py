"""Converts a dataset in a user format into a consist dataset (one split), streaming.

  python -m launch.convert --format qm9 --input dsgdb9nsd.xyz.tar.bz2 --out data/qm9 [--split train]
      [--skip_bad] [--overwrite] [--fidelity TAG] [--structure_fidelity TAG] [--smiles_csv PATH]

Formats: extxyz, asedb, qm9, pcqm4mv2, spice, pubchemqc (see `consist.data.convert`). Units are
converted to Å / eV / eV/Å by the readers. Without --skip_bad the first bad record stops the run with
an error naming file and record, and no dataset is left at --out; with it, bad records are skipped
and counted by reason. The report (read / written / skipped by reason) is printed as JSON and saved
as <out>/conversion_report.json.
"""

import json
import sys
from pathlib import Path

from absl import app, flags

from launch import _cli

from consist.data import convert

_FORMAT = flags.DEFINE_enum("format", None, list(convert.FORMATS), "Input format.")
_INPUT = flags.DEFINE_string("input", None, "Input file, directory or archive.")
_OUT = flags.DEFINE_string("out", None, "Output dataset directory.")
_SPLIT = flags.DEFINE_string("split", "train", "Name of the split to write.")
_SKIP_BAD = flags.DEFINE_bool("skip_bad", False, "Skip bad records (counted by reason) instead of failing.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset at --out.")
_FIDELITY = flags.DEFINE_string(
    "fidelity", None, "Label fidelity tag (level of theory of energies/forces), lower case, e.g. "
    "'gfn2-xtb' (extxyz, asedb; spice default: wb97m-d3bj/def2-tzvppd).")
_STRUCTURE_FIDELITY = flags.DEFINE_string(
    "structure_fidelity", None, "Level of theory that produced the positions (extxyz, asedb).")
_SMILES_CSV = flags.DEFINE_string(
    "smiles_csv", None, "pcqm4mv2: the data.csv.gz (idx,smiles,...); default: found next to the SDF.")
flags.mark_flags_as_required(["format", "input", "out"])

_OPTION_FLAGS = {"fidelity": _FIDELITY, "structure_fidelity": _STRUCTURE_FIDELITY,
                 "smiles_csv": _SMILES_CSV}


def _options(fmt: str) -> dict[str, str]:
  """Reader keyword options from the flags; a flag that does not apply to `fmt` is a usage error."""
  accepted = convert.OPTIONS[fmt]
  options = {}
  for name, flag in _OPTION_FLAGS.items():
    if flag.value is None:
      continue
    if name not in accepted:
      raise app.UsageError(f"--{name} does not apply to --format={fmt} (it takes: "
                           f"{', '.join('--' + o for o in accepted) or 'no options'})")
    if name.endswith("fidelity") and flag.value != flag.value.lower():
      raise app.UsageError(f"--{name}={flag.value!r}: fidelity tags are lower case")
    options[name] = flag.value
  return options


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fmt = _FORMAT.value
  options = _options(fmt)
  if not Path(_INPUT.value).exists():
    raise app.UsageError(f"--input={_INPUT.value}: no such file or directory")
  try:
    result = convert.convert_to_dataset(fmt, _INPUT.value, _OUT.value, split=_SPLIT.value,
                                        skip_bad=_SKIP_BAD.value, overwrite=_OVERWRITE.value, **options)
  except (ValueError, FileNotFoundError) as e:  # ConversionError, StoreError: bad data or target
    print(f"convert: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  _cli.run(main, "launch.convert")
