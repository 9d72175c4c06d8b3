"""Converts a dataset in a user format into a consist dataset, streaming.

  python -m launch.convert --format qm9 --input dsgdb9nsd.xyz.tar.bz2 --out data/qm9 [--split train]
      [--skip_bad] [--overwrite] [--fidelity TAG] [--structure_fidelity TAG] [--smiles_csv PATH]
  python -m launch.convert --format extxyz --input frames.extxyz --out data/mine --fidelity pbe/def2-svp \
      --split_fractions 0.9,0.05,0.05 [--split_by molecule|scaffold] [--split_seed 0]

Without --split_fractions one split (--split, default train) is written; with it, train / val / test
(what `launch.train` reads), whole molecules (all conformations of one mol_id) or whole Bemis-Murcko
scaffolds of the SMILES in one split each, the input being read twice.

Formats: extxyz, asedb, qm9, pcqm4mv2, spice, pubchemqc (see `consist.data.convert`). Units are
converted to Å / eV / eV/Å by the readers. Without --skip_bad the first bad record stops the run with
an error naming file and record, and no dataset is left at --out; with it, bad records are skipped
and counted by reason. The report (read / written / skipped by reason) is printed as JSON and saved
as <out>/conversion_report.json.
"""

import json
from pathlib import Path

from absl import app, flags

from launch import _cli

from consist.data import convert, store_format
from consist.data.convert import splits

PROG = "launch.convert"

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
_SPLIT_FRACTIONS = flags.DEFINE_string(
    "split_fractions", None, "TRAIN,VAL[,TEST] fractions of the records, e.g. 0.9,0.05,0.05: writes the "
    "splits train, val[, test] instead of --split.")
_SPLIT_BY = flags.DEFINE_enum("split_by", "molecule", ["molecule", "scaffold"],
                              "--split_fractions groups: one mol_id, or one Bemis-Murcko scaffold (needs SMILES).")
_SPLIT_SEED = flags.DEFINE_integer("split_seed", 0, "Seed of the --split_fractions assignment.")
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
  fractions = None
  if _SPLIT_FRACTIONS.value is not None:
    if flags.FLAGS["split"].present:
      raise app.UsageError("--split and --split_fractions exclude each other (--split_fractions writes "
                           "train, val and test)")
    try:
      fractions = splits.parse_fractions(_SPLIT_FRACTIONS.value)
    except ValueError as e:
      raise app.UsageError(f"--split_fractions={e}") from None
  _check_out(Path(_OUT.value))
  try:
    result = convert.convert_to_dataset(fmt, _INPUT.value, _OUT.value, split=_SPLIT.value,
                                        skip_bad=_SKIP_BAD.value, overwrite=_OVERWRITE.value,
                                        split_fractions=fractions, split_by=_SPLIT_BY.value,
                                        split_seed=_SPLIT_SEED.value, **options)
  except (ValueError, FileNotFoundError) as e:  # ConversionError, StoreError: bad data or target
    _cli.fail(PROG, str(e), exit_code=1)
  print(json.dumps(result, indent=2))


def _check_out(out: Path) -> None:
  """An existing --out is replaced only with --overwrite, and only if it is a consist dataset."""
  if not out.exists() or _OVERWRITE.value:
    return
  if (out / store_format.DATASET_JSON).exists():
    try:
      names = list(json.loads((out / store_format.DATASET_JSON).read_text())["splits"])
    except (ValueError, KeyError):
      names = "?"
    raise app.UsageError(
        f"--out={out}: already holds a dataset (splits {names}); pass --overwrite to replace it (a "
        "dataset is written whole: use --split_fractions to write train, val and test in one conversion)")
  raise app.UsageError(f"--out={out}: already exists; give a new directory (or --overwrite to replace a "
                       "consist dataset)")


if __name__ == "__main__":
  _cli.run(main, PROG)
