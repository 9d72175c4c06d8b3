"""QM9 (Ramakrishnan et al. 2014): the original `dsgdb9nsd_*.xyz` files.

Layout of one file (n atoms, n + 5 lines):
  1      n
  2      `gdb N` then 15 properties: A B C (GHz) mu (D) alpha (a0^3) homo lumo gap (Ha) r2 (a0^2)
         zpve U0 U H G (Ha) Cv (cal/mol K)
  3..n+2 `El x y z q` (Å, Mulliken charge); numbers may use Mathematica's `*^` exponent (`1.2*^-6`)
  n+3    harmonic frequencies (cm^-1)
  n+4    GDB SMILES and relaxed B3LYP SMILES, tab separated
  n+5    GDB and relaxed InChI

Records: energy = U0 (Ha -> eV), structures and labels at B3LYP/6-31G(2df,p), equilibrium
structures, neutral singlets. The SMILES is not atom-ordered like the coordinates, so the bond
graph is perceived from the coordinates (RDKit `DetermineBonds`, aromatic = 1.5); where that fails,
connectivity only (orders set to 1) or no bonds, counted in the report's notes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from consist import units
from consist.data.convert import bonds as bonds_lib
from consist.data.convert import sources
from consist.data.convert.elements import atomic_number
from consist.data.convert.report import BadRecord, ConversionReport
from consist.data.record import MoleculeRecord

FIDELITY = "b3lyp/6-31g(2df,p)"
PROPERTIES = ("A", "B", "C", "mu", "alpha", "homo", "lumo", "gap", "r2", "zpve",
              "U0", "U", "H", "G", "Cv")


def read(path: str | Path, report: ConversionReport) -> Iterator[MoleculeRecord]:
  """Yields one record per QM9 file in `path` (a file, a directory or a tar archive of them)."""
  for where, content in sources.members(path, "*.xyz", report):
    record = report.build(where, lambda: parse(content, where, report))
    if record is not None:
      yield record


def _number(text: str) -> float:
  return float(text.replace("*^", "e"))


def parse(content: bytes, where: str, report: ConversionReport) -> MoleculeRecord:
  """One QM9 file -> record (unvalidated). Raises BadRecord for malformed or truncated files."""
  lines = content.decode("utf-8").splitlines()
  if not lines or not lines[0].strip():
    raise BadRecord("truncated", "empty file")
  try:
    n = int(lines[0])
  except ValueError:
    raise BadRecord("parse_error", f"line 1 should be the atom count, got {lines[0]!r}") from None
  if len(lines) < n + 5:
    raise BadRecord("truncated", f"{len(lines)} lines, expected {n + 5} for {n} atoms")
  head = lines[1].split()
  if len(head) != 2 + len(PROPERTIES) or head[0] != "gdb":
    raise BadRecord("parse_error", f"line 2 should be 'gdb N' and {len(PROPERTIES)} properties, "
                                   f"got {len(head)} fields")
  props = dict(zip(PROPERTIES, map(_number, head[2:])))
  z, xyz = [], []
  for k, line in enumerate(lines[2:2 + n]):
    fields = line.split()
    if len(fields) != 5:
      raise BadRecord("parse_error", f"atom {k} (line {k + 3}): expected 'El x y z q', got {line!r}")
    z.append(atomic_number(fields[0]))
    xyz.append([_number(v) for v in fields[1:4]])
  atomic_numbers = np.asarray(z, dtype=np.int32)
  positions = np.asarray(xyz, dtype=np.float64).reshape(n, 3)
  smiles = lines[n + 3].split()
  bonds = orders = None
  if n > 0 and np.isfinite(positions).all():
    bonds, orders, quality = bonds_lib.bonds_from_coordinates(atomic_numbers, positions, charge=0)
    if quality != "orders":
      report.note(f"bonds_{quality}", f"{where}: RDKit could not assign bond orders from coordinates")
  return MoleculeRecord(
      mol_id=f"dsgdb9nsd_{int(head[1]):06d}",
      atomic_numbers=atomic_numbers,
      positions=positions,
      charge=0,
      multiplicity=1,
      smiles=smiles[-1] if smiles else "",
      bonds=bonds,
      bond_orders=orders,
      energy=props["U0"] * units.HARTREE_TO_EV,
      is_equilibrium=True,
      structure_fidelity=FIDELITY,
      label_fidelity=FIDELITY,
  )
