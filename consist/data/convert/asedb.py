"""ASE databases (`ase.db`, SQLite / JSON): one record per row.

Energy and forces from the row's calculator fields (`row.energy`, `row.forces`, eV and eV/Å);
metadata from the key-value pairs (see `ase_atoms.atoms_to_record`); mol_id defaults to the row id.
`charge` is an ase.db column (the sum of the atoms' initial charges), so the total charge is the
key-value pair `total_charge` if present, else that column.

The input is opened read-only (an SQLite connection in `mode=ro`; a JSON database is only read):
`ase.db.connect` would add ASE's tables to any SQLite file it is given, and upgrade old databases in
place. A file that is not an ASE database is refused, naming what it holds.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Iterator

from ase.db.core import Database
from ase.db.jsondb import JSONDatabase
from ase.db.sqlite import SQLite3Database

from consist.data.convert import sniff
from consist.data.convert.ase_atoms import atoms_to_record
from consist.data.convert.report import ConversionError, ConversionReport
from consist.data.record import MoleculeRecord


def _connect_read_only(path: Path) -> sqlite3.Connection:
  return sqlite3.connect(f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro", uri=True, timeout=20)


class _ReadOnlySQLite3Database(SQLite3Database):
  """ASE's SQLite reader over a read-only connection: any attempt to write fails instead of
  changing the user's file."""

  def _connect(self):
    return _connect_read_only(Path(self.filename))


def open_database(path: Path) -> Database:
  """The ASE database in the file `path`, opened read-only.

  Raises:
    ConversionError: `path` is not an ASE database (naming its tables or what it looks like).
  """
  kind = sniff.kind_of(path)
  if kind == "sqlite":
    con = _connect_read_only(path)
    try:
      tables = sorted(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'"))
    except sqlite3.DatabaseError as e:
      raise ConversionError(f"{path}: not a readable SQLite database ({e})") from None
    finally:
      con.close()
    if "systems" not in tables:
      raise ConversionError(f"{path}: not an ASE database (tables: {', '.join(tables) or 'none'})")
    return _ReadOnlySQLite3Database(str(path), create_indices=False, use_lock_file=False)
  if kind == "json":
    try:
      with open(path, encoding="utf-8") as f:
        content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConversionError(f"{path}: not an ASE database (invalid JSON: {e})") from None
    if not isinstance(content, dict) or "ids" not in content:
      raise ConversionError(f"{path}: not an ASE database (JSON without ASE's 'ids' entry)")
    return JSONDatabase(str(path), use_lock_file=False)
  raise ConversionError(f"{path}: not an ASE database ({sniff.describe(path)})")


def read(path: str | Path, report: ConversionReport, *, fidelity: str = "",
         structure_fidelity: str = "") -> Iterator[MoleculeRecord]:
  """Yields one record per row of the ASE database `path` (ordered by row id).

  Args:
    fidelity: label fidelity tag of the energies / forces (else the row's `label_fidelity` key).
    structure_fidelity: level of theory of the positions (else the row's `structure_fidelity` key).
  """
  path = Path(path)
  sniff.check_input_file(path, "asedb")
  database = open_database(path)
  try:
    yield from _records(path, database.select(), report, fidelity, structure_fidelity)
  except sqlite3.OperationalError as e:  # e.g. an old-version database ASE would upgrade in place
    raise ConversionError(f"{path}: cannot read this ASE database without modifying it ({e}); "
                          "convert a copy of it") from None


def _records(path: Path, rows, report: ConversionReport, fidelity: str,
             structure_fidelity: str) -> Iterator[MoleculeRecord]:
  for row in rows:
    where = f"{path}: row id {row.id}"
    info = {k: v for k, v in row.key_value_pairs.items() if k != "charge"}
    info.setdefault("total_charge", row.charge)
    record = report.build(where, lambda: atoms_to_record(
        row.toatoms(), info, mol_id=str(row.id), energy=row.get("energy"),
        forces=row.get("forces"), fidelity=fidelity, structure_fidelity=structure_fidelity))
    if record is not None:
      yield record
