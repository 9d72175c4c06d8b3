"""ASE databases (`ase.db`, SQLite / JSON): one record per row.

Energy and forces from the row's calculator fields (`row.energy`, `row.forces`, eV and eV/Å);
metadata from the key-value pairs (see `ase_atoms.atoms_to_record`); mol_id defaults to the row id.
`charge` is an ase.db column (the sum of the atoms' initial charges), so the total charge is the
key-value pair `total_charge` if present, else that column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import ase.db

from consist.data.convert.ase_atoms import atoms_to_record
from consist.data.convert.report import ConversionReport
from consist.data.record import MoleculeRecord


def read(path: str | Path, report: ConversionReport, *, fidelity: str = "",
         structure_fidelity: str = "") -> Iterator[MoleculeRecord]:
  """Yields one record per row of the ASE database `path` (ordered by row id).

  Args:
    fidelity: label fidelity tag of the energies / forces (else the row's `label_fidelity` key).
    structure_fidelity: level of theory of the positions (else the row's `structure_fidelity` key).
  """
  path = Path(path)
  if not path.is_file():  # ase.db.connect would create an empty database
    raise FileNotFoundError(f"{path}: no such file")
  for row in ase.db.connect(path).select():
    where = f"{path}: row id {row.id}"
    info = {k: v for k, v in row.key_value_pairs.items() if k != "charge"}
    info.setdefault("total_charge", row.charge)
    record = report.build(where, lambda: atoms_to_record(
        row.toatoms(), info, mol_id=str(row.id), energy=row.get("energy"),
        forces=row.get("forces"), fidelity=fidelity, structure_fidelity=structure_fidelity))
    if record is not None:
      yield record
