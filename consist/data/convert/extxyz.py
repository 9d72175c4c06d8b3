"""Extended XYZ (ASE's extxyz) trajectories: one record per frame.

Frames are delimited here (atom count line, comment line, n atom lines) and each is parsed by
`ase.io.read(format="extxyz")`, so one bad frame is one bad record and a file cut mid-frame is
reported as "truncated". Energy and forces come from the calculator fields (the SinglePointCalculator
ASE attaches for `energy=` / `forces` properties) or the info / arrays keys `energy` / `forces`,
in ASE units (eV, eV/Å). Metadata: see `ase_atoms.atoms_to_record`; mol_id defaults to the frame index.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import ase
import ase.io
import numpy as np

from consist.data.convert import sniff
from consist.data.convert.ase_atoms import atoms_to_record
from consist.data.convert.report import BadRecord, ConversionError, ConversionReport
from consist.data.record import MoleculeRecord


def read(path: str | Path, report: ConversionReport, *, fidelity: str = "",
         structure_fidelity: str = "") -> Iterator[MoleculeRecord]:
  """Yields one record per frame of the extxyz file `path`.

  Args:
    fidelity: label fidelity tag of the energies / forces (else the frame's `label_fidelity` key).
    structure_fidelity: level of theory of the positions (else the frame's `structure_fidelity` key).
  """
  path = Path(path)
  sniff.check_input_file(path, "extxyz")
  if sniff.kind_of(path) not in ("xyz", "text", "empty"):
    raise ConversionError(f"{path}: not a text extxyz file ({sniff.describe(path)})")
  for index, start_line, frame in _frames(path, report):
    where = f"{path}: frame {index} (line {start_line})"
    record = report.build(where, lambda: _record(frame, index, fidelity, structure_fidelity))
    if record is not None:
      yield record


def _frames(path: Path, report: ConversionReport) -> Iterator[tuple[int, int, str]]:
  """Yields (frame index, 1-based first line, frame text); a frame cut short is reported truncated."""
  try:
    yield from split_frames(path, report.lose)
  except UnicodeDecodeError as e:
    raise ConversionError(f"{path}: not a text extxyz file (bytes that are not UTF-8 text at byte "
                          f"{e.start} of a line)") from None


def split_frames(path: Path, lose) -> Iterator[tuple[int, int, str]]:
  """Yields (frame index, 1-based first line, frame text) of the XYZ file `path`.

  A frame cut short by the end of the file is passed to `lose(where, "truncated", detail)`;
  ConversionError if an atom-count line is not one (the frames after it cannot be located).
  """
  with open(path, encoding="utf-8") as f:
    line_no = 0
    index = 0
    while True:
      count_line = f.readline()
      line_no += 1
      if not count_line:
        return
      if not count_line.strip():
        if f.read().strip():  # blank lines are only allowed at the end of the file
          raise ConversionError(
              f"{path}: line {line_no}: blank line where frame {index}'s atom count should be")
        return
      n = _atom_count(count_line)
      if n is None:
        raise ConversionError(
            f"{path}: line {line_no}: frame {index} should start with an atom count, got "
            f"{count_line.strip()!r}; the frames after it cannot be located")
      lines = [count_line]
      for _ in range(n + 1):
        line = f.readline()
        if not line:
          lose(f"{path}: frame {index} (line {line_no})", "truncated",
               f"file ends after {max(len(lines) - 2, 0)} of {n} atom lines")
          return
        lines.append(line)
      yield index, line_no, "".join(lines)
      line_no += n + 1
      index += 1


def _atom_count(line: str) -> int | None:
  try:
    n = int(line.split()[0])
  except ValueError:
    return None
  return n if n >= 0 else None


def _record(frame: str, index: int, fidelity: str, structure_fidelity: str) -> MoleculeRecord:
  try:
    atoms = ase.io.read(io.StringIO(frame), format="extxyz")
  except KeyError as e:  # ase.symbols: unknown chemical symbol
    raise BadRecord("unknown_element", f"unknown element symbol {e}") from None
  energy, forces = energy_and_forces(atoms)
  return atoms_to_record(atoms, atoms.info, mol_id=str(index), energy=energy, forces=forces,
                         fidelity=fidelity, structure_fidelity=structure_fidelity)


def energy_and_forces(atoms: ase.Atoms) -> tuple[float | None, np.ndarray | None]:
  """(energy eV | None, forces eV/Å [n, 3] | None) from the calculator results, else info / arrays."""
  results = atoms.calc.results if atoms.calc is not None else {}
  energy = results.get("energy", atoms.info.get("energy"))
  forces = results.get("forces", atoms.arrays.get("forces"))
  return (None if energy is None else float(energy),
          None if forces is None else np.asarray(forces))
