"""OGB-LSC PCQM4Mv2: the training-set SDF of DFT (B3LYP/6-31G*) equilibrium structures + SMILES CSV.

`pcqm4m-v2-train.sdf` holds the 3D structure of molecule idx = 0, 1, 2, ... in order (hydrogens
explicit, bond orders as written); `data.csv.gz` (columns idx, smiles, homolumogap) gives the
SMILES of every idx. No energy: records carry the structure label only (is_equilibrium True,
structure fidelity `b3lyp/6-31g*`). Charge and multiplicity come from the molfile's formal charges
and radicals.

The SDF is split at its `$$$$` lines here and each molfile parsed by RDKit (`MolFromMolBlock`,
unsanitised, hydrogens kept, the parser `SDMolSupplier` uses), so one bad molecule is one bad
record and a file cut mid-molecule is reported as "truncated".
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path
from typing import Iterator, TextIO

import numpy as np
from rdkit import Chem

from consist.data.convert import sniff
from consist.data.convert.bonds import bonds_of, quiet_rdkit
from consist.data.convert.elements import atomic_number
from consist.data.convert.report import BadRecord, ConversionReport
from consist.data.record import MoleculeRecord

FIDELITY = "b3lyp/6-31g*"
CSV_NAME = "data.csv.gz"


def default_smiles_csv(sdf: Path) -> Path:
  """`data.csv.gz` next to the SDF, or in the OGB layout `<dir>/pcqm4m-v2/raw/data.csv.gz`."""
  for candidate in (sdf.parent / CSV_NAME, sdf.parent / "raw" / CSV_NAME,
                    sdf.parent / "pcqm4m-v2" / "raw" / CSV_NAME):
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(
      f"{sdf}: no {CSV_NAME} next to it (or in raw/, pcqm4m-v2/raw/); give --smiles_csv")


def read(path: str | Path, report: ConversionReport, *, smiles_csv: str | Path | None = None
         ) -> Iterator[MoleculeRecord]:
  """Yields one record per molecule of the PCQM4Mv2 SDF `path` (plain or .gz).

  Args:
    smiles_csv: the `data.csv.gz` with columns idx, smiles, ...; found next to the SDF by default.
  """
  path = Path(path)
  sniff.check_input_file(path, "pcqm4mv2")
  csv_path = Path(smiles_csv) if smiles_csv else default_smiles_csv(path)
  if not csv_path.is_file():
    raise FileNotFoundError(f"{csv_path}: no such file")
  with _open_text(path) as sdf, _open_text(csv_path) as table:
    rows = _smiles_rows(csv_path, table)
    for idx, line_no, block in _molfiles(path, sdf, report):
      smiles = _smiles_of(rows, idx, csv_path)
      where = f"{path}: molecule {idx} (line {line_no})"
      record = report.build(where, lambda: _record(block, idx, smiles))
      if record is not None:
        yield record


def _open_text(path: Path) -> TextIO:
  if path.name.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, encoding="utf-8")


def _smiles_rows(csv_path: Path, table: TextIO) -> Iterator[tuple[int, str]]:
  reader = csv.DictReader(table)
  if reader.fieldnames is None or not {"idx", "smiles"} <= set(reader.fieldnames):
    raise ValueError(f"{csv_path}: expected columns idx, smiles, ...; got {reader.fieldnames}")
  for row in reader:
    yield int(row["idx"]), row["smiles"]


def _smiles_of(rows: Iterator[tuple[int, str]], idx: int, csv_path: Path) -> str:
  """The SMILES of molecule idx from the CSV stream (rows in idx order, the SDF's order)."""
  row = next(rows, None)
  if row is None:
    raise ValueError(f"{csv_path}: ends before idx {idx}; is it the CSV of this SDF?")
  if row[0] != idx:
    raise ValueError(
        f"{csv_path}: row with idx {row[0]} where idx {idx} was expected (CSV and SDF out of step)")
  return row[1]


def _molfiles(path: Path, sdf: TextIO, report: ConversionReport) -> Iterator[tuple[int, int, str]]:
  """Yields (index, first line, molfile text) per `$$$$`-terminated record; reports a cut-off tail."""
  lines: list[str] = []
  start = 1
  idx = 0
  for line_no, line in enumerate(sdf, start=1):
    if line.startswith("$$$$"):
      yield idx, start, "".join(lines)
      idx += 1
      lines = []
      start = line_no + 1
    else:
      lines.append(line)
  if "".join(lines).strip():
    report.lose(f"{path}: molecule {idx} (line {start})", "truncated",
                "file ends before the record's '$$$$' line")


def _record(block: str, idx: int, smiles: str) -> MoleculeRecord:
  if "M  END" not in block:
    raise BadRecord("truncated", "molfile has no 'M  END' line")
  with quiet_rdkit():  # its parse errors become BadRecord messages
    mol = Chem.MolFromMolBlock(block, sanitize=False, removeHs=False)
  if mol is None:
    _check_elements(block)
    raise BadRecord("parse_error", "RDKit cannot parse the molfile")
  bonds, orders = bonds_of(mol)
  return MoleculeRecord(
      mol_id=f"pcqm4mv2:{idx}",
      atomic_numbers=np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int32),
      positions=mol.GetConformer().GetPositions() if mol.GetNumConformers() else np.zeros((0, 3)),
      charge=sum(a.GetFormalCharge() for a in mol.GetAtoms()),
      multiplicity=1 + sum(a.GetNumRadicalElectrons() for a in mol.GetAtoms()),
      smiles=smiles,
      bonds=bonds,
      bond_orders=orders,
      is_equilibrium=True,
      structure_fidelity=FIDELITY,
  )


def _check_elements(block: str) -> None:
  """Raises BadRecord("unknown_element") if a V2000 atom line names no element."""
  lines = block.splitlines()
  try:
    n_atoms = int(lines[3][:3])
  except (IndexError, ValueError):
    return
  for k, line in enumerate(lines[4:4 + n_atoms]):
    symbol = line[31:34].strip()
    try:
      atomic_number(symbol)
    except BadRecord as e:
      raise BadRecord("unknown_element", f"atom {k}: {e}") from None
