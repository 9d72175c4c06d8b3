"""Streams a reader's records into a consist dataset (one split, or train/val/test by molecule or
scaffold) and writes the conversion report.

Split fractions need the group sizes before the first record is written, so the input is read
twice then: once for the group keys (memory: one key per group), once to write.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from consist.data.convert import splits as splits_lib
from consist.data.convert.formats import reader
from consist.data.convert.report import ConversionError, ConversionReport
from consist.data.record import MoleculeRecord, RecordError
from consist.data.store import DatasetWriter

REPORT_NAME = "conversion_report.json"
# Median over records of each record's shortest interatomic distance (Å) outside this range: the
# coordinates are probably not in Å (bohr labelled as Å gives ~2.05 for C-H, nm gives ~0.11).
PLAUSIBLE_SHORTEST_DISTANCE = (0.7, 1.8)
UNIT_CHECK_RECORDS = 2000


class _ShortestDistances:
  """Shortest interatomic distance of the first UNIT_CHECK_RECORDS records of more than one atom."""

  def __init__(self):
    self.values: list[float] = []

  def add(self, record: MoleculeRecord) -> None:
    n = record.n_atoms
    if len(self.values) >= UNIT_CHECK_RECORDS or n < 2:
      return
    pos = np.asarray(record.positions, dtype=np.float64)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    d[np.diag_indices(n)] = np.inf
    self.values.append(float(d.min()))

  def warning(self, input_path) -> str | None:
    if not self.values:
      return None
    median = float(np.median(self.values))
    lo, hi = PLAUSIBLE_SHORTEST_DISTANCE
    if lo <= median <= hi:
      return None
    guess = ("bohr labelled as Å? (x 0.529 gives Å)" if 1.8 < median < 3.5 else
             "nm labelled as Å? (x 10 gives Å)" if 0.05 < median < 0.2 else "not Å?")
    return (f"{input_path}: the median shortest interatomic distance over {len(self.values)} records "
            f"is {median:.3g} Å, outside the {lo}-{hi} Å of molecules: are the coordinates in {guess} "
            "Check the input's units; the dataset was written as given")


def convert_to_dataset(fmt: str, input_path: str | Path, out: str | Path, *,
                       split: str = "train", skip_bad: bool = False, overwrite: bool = False,
                       split_fractions: str | Sequence[float] | None = None, split_by: str = "molecule",
                       split_seed: int = 0, **options: Any) -> dict[str, Any]:
  """Converts `input_path` (format `fmt`) into the dataset `out`; returns the report as JSON.

  The dataset's attrs record the source (format, input, options); the report is also written to
  `<out>/conversion_report.json`. Records the store rejects (its own checks) count as skipped too.
  Coordinates whose nearest-neighbour distances are implausible in Å give a warning (in the report's
  "warnings" and on stderr).

  Args:
    split: the one split written when `split_fractions` is None.
    split_fractions: (train, val[, test]) fractions of the records, or "0.9,0.05,0.05": writes those
      splits, whole groups of `split_by` ("molecule": one mol_id; "scaffold": one Bemis-Murcko
      scaffold of the SMILES) in one split each (`consist.data.convert.splits`), seeded by `split_seed`.

  Raises:
    ConversionError: a bad record without `skip_bad`, or no record converted at all. Nothing is
      finalised at `out` then (a previous dataset there is left untouched).
  """
  read = reader(fmt)
  fractions = None if split_fractions is None else splits_lib.parse_fractions(split_fractions)
  if split_by not in splits_lib.SPLIT_BY:
    raise ValueError(f"split_by: expected one of {splits_lib.SPLIT_BY}, got {split_by!r}")
  assignment = None
  if fractions is not None:
    assignment = _assign_groups(read, fmt, input_path, options, fractions, split_by, split_seed)
  # The store validates every record on append: the reader need not validate it too.
  report = ConversionReport(format=fmt, input=str(input_path), skip_bad=skip_bad, validate=False)
  source = {"format": fmt, "input": str(input_path),
            "options": {k: str(v) for k, v in options.items()}}
  if fractions is not None:
    source["splits"] = {"fractions": list(fractions), "by": split_by, "seed": split_seed}
  distances = _ShortestDistances()
  written: dict[str, int] = {}
  with DatasetWriter(out, overwrite=overwrite, attrs={"source": source}) as dataset:
    for record in read(input_path, report, **options):
      name = split
      if assignment is not None:
        name = assignment[splits_lib.group_key(record, split_by, report.where)]
      try:
        dataset.split(name).append(record, where=report.where)
      except RecordError as e:
        report.bad(e.reason, str(e))
        continue
      report.written += 1
      written[name] = written.get(name, 0) + 1
      distances.add(record)
    if report.written == 0:
      raise ConversionError(f"{input_path}: no record could be converted "
                            f"({report.read} read, skipped: {dict(report.skipped)})")
  result = {**report.to_json(), "out": str(out)}
  if fractions is None:
    result["split"] = split
  else:
    names = splits_lib.SPLIT_NAMES[:len(fractions)]
    result["splits"] = {name: written.get(name, 0) for name in names}
    result["split_by"], result["split_fractions"] = split_by, list(fractions)
  warning = distances.warning(input_path)
  result["warnings"] = [warning] if warning else []
  if warning:
    print(f"warning: {warning}", file=sys.stderr, flush=True)
  (Path(out) / REPORT_NAME).write_text(json.dumps(result, indent=2) + "\n")
  return result


def _assign_groups(read, fmt: str, input_path, options: dict, fractions: Sequence[float], split_by: str,
                   seed: int) -> dict[str, str]:
  """First pass: the size of every group, then {group key: split}; ConversionError if a requested
  split would be empty (too few molecules / scaffolds for the fractions)."""
  scan = ConversionReport(format=fmt, input=str(input_path), skip_bad=True, validate=False)
  sizes: dict[str, int] = {}
  for record in read(input_path, scan, **options):
    key = splits_lib.group_key(record, split_by, scan.where)
    sizes[key] = sizes.get(key, 0) + 1
  assignment = splits_lib.assign(sizes, fractions, seed)
  counts = splits_lib.split_sizes(sizes.items(), assignment)
  names = splits_lib.SPLIT_NAMES[:len(fractions)]
  empty = [n for n, f in zip(names, fractions) if f > 0 and not counts.get(n)]
  if sizes and empty:
    raise ConversionError(
        f"{input_path}: {len(sizes)} {split_by} group(s) ({sum(sizes.values())} records) cannot fill "
        f"split(s) {empty} with fractions {list(fractions)}; convert more data or use fewer splits")
  return assignment
