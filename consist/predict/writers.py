"""Prediction output: SDF (bond graph kept) or extended XYZ, written atomically.

Each structure is one entry, in input order, samples of a molecule consecutive. Both formats carry
the predicted energy (eV, at the run's first fidelity), the generation mode, the sample index and
the source SMILES; SDF entries are titled with the molecule name, extended-XYZ frames have it in
`info["name"]` and the energy / forces as ASE calculator results (read back by `ase.io.read`).

The file appears only complete: it is written to a hidden temporary file in the output directory
and moved over the target with `os.replace` (atomic on one filesystem).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Iterator, Sequence

import ase
import ase.io
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from rdkit import Chem
from rdkit.Geometry import Point3D

from consist.predict.molecules import Molecule

OUTPUT_SUFFIXES = (".sdf", ".xyz")


@dataclasses.dataclass(frozen=True)
class Structure:
  """One predicted structure.

  Attributes:
    molecule: the input molecule (name, SMILES, bond graph).
    sample: index k of the sample.
    positions: float64 [n, 3], Å.
    energy: model energy at `positions`, eV.
    forces: float64 [n, 3], eV/Å, model forces at `positions` (-dE/dR).
    mode: generation mode ("denoise" / "ddim" / "refine").
    relaxed: polished on the learned energy (`--relax`).
  """

  molecule: Molecule
  sample: int
  positions: np.ndarray
  energy: float
  forces: np.ndarray
  mode: str
  relaxed: bool

  @property
  def max_force(self) -> float:
    return float(np.linalg.norm(self.forces, axis=1).max())


class OutputPathError(ValueError):
  """The output path cannot be written (the message names it)."""


def check_output_path(path: str | Path) -> Path:
  """Raises OutputPathError unless `path` has a known suffix and its directory exists and is
  writable (tested by creating and removing a temporary file there)."""
  path = Path(path)
  if path.suffix.lower() not in OUTPUT_SUFFIXES:
    raise OutputPathError(f"{path}: unknown output format {path.suffix!r}; expected one of {OUTPUT_SUFFIXES}")
  if path.is_dir():
    raise OutputPathError(f"{path}: is a directory")
  if not path.parent.is_dir():
    raise OutputPathError(f"{path}: directory {path.parent} does not exist")
  probe = _temporary(path)
  try:
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise OutputPathError(f"{path}: cannot write there: {e.strerror or e}") from e
  return path


def _temporary(path: Path) -> Path:
  return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
  """A temporary path next to `path`, moved over it on success and removed on failure."""
  tmp = _temporary(path)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      tmp.unlink()


def _sdf_entry(s: Structure) -> Chem.Mol:
  mol = Chem.Mol(s.molecule.mol)
  mol.RemoveAllConformers()
  conf = Chem.Conformer(mol.GetNumAtoms())
  for i, (x, y, z) in enumerate(np.asarray(s.positions, dtype=np.float64)):
    conf.SetAtomPosition(i, Point3D(float(x), float(y), float(z)))
  conf.Set3D(True)
  mol.AddConformer(conf, assignId=True)
  mol.SetProp("_Name", s.molecule.name)
  mol.SetDoubleProp("energy_eV", s.energy)
  mol.SetDoubleProp("max_force_eV_per_A", s.max_force)
  mol.SetProp("mode", s.mode)
  mol.SetIntProp("sample", s.sample)
  mol.SetIntProp("relaxed", int(s.relaxed))
  mol.SetProp("smiles", s.molecule.smiles)
  return mol


def _xyz_frame(s: Structure) -> ase.Atoms:
  atoms = ase.Atoms(numbers=s.molecule.atomic_numbers, positions=s.positions)
  atoms.info.update(name=s.molecule.name, smiles=s.molecule.smiles, mode=s.mode, sample=s.sample,
                    relaxed=s.relaxed, charge=s.molecule.charge)
  atoms.calc = SinglePointCalculator(atoms, energy=s.energy, forces=s.forces)
  return atoms


def write_structures(path: str | Path, structures: Sequence[Structure]) -> Path:
  """Writes `structures` as SDF or extended XYZ (by suffix), atomically; returns the path."""
  path = Path(path)
  with _atomic(path) as tmp:
    if path.suffix.lower() == ".sdf":
      writer = Chem.SDWriter(str(tmp))
      for s in structures:
        writer.write(_sdf_entry(s))
      writer.close()
    else:
      ase.io.write(tmp, [_xyz_frame(s) for s in structures], format="extxyz")
  return path
