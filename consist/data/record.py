"""The molecular record: one conformation of one molecule with optional labels.

Units (BRIEF section 7): positions and reference positions in Å, energies in eV, forces in eV/Å.
Readers convert hartree / bohr before building a record (see `consist.units`).

Every label is optional per sample; absence is `None`, never NaN. Several conformations of one
molecule share `mol_id`. Fidelity tags name the level of theory that produced a quantity, in the
lower-case form `consist.levels` uses (`mmff94`, `gfn2-xtb`, `pm6`, `b3lyp/6-31g*`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

MAX_Z = 118
# Two atoms closer than this (Å) are treated as a duplicated atom, not a molecule.
MIN_INTERATOMIC_DISTANCE = 0.1
# Bond orders accepted in a bond graph: single, aromatic, double, triple (and higher for metals).
VALID_BOND_ORDERS = (1.0, 1.5, 2.0, 3.0, 4.0)


def _json_array(arr: np.ndarray) -> list:
  """Nested lists of Python numbers; float32 values print as their shortest float32 repr (0.74, not 0.7400000095)."""
  arr = np.asarray(arr)
  if arr.dtype == np.float32:
    shortest = [float(str(v)) for v in arr.ravel()]  # str(np.float32) is the shortest round-trip repr
    return np.array(shortest, dtype=object).reshape(arr.shape).tolist()
  return arr.tolist()


class RecordError(ValueError):
  """A record is malformed. The message names the source and record at fault.

  Attributes:
    reason: a short snake_case key converters count skipped records under.
  """

  def __init__(self, message: str, reason: str = "invalid_record"):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True, eq=False)
class MoleculeRecord:
  """One conformation. Arrays are numpy; shapes use n = atoms, b = bonds.

  Attributes:
    mol_id: identifier shared by all conformations of one molecule.
    atomic_numbers: int [n], 1..118.
    positions: float [n, 3], Å.
    charge: total charge, e.
    multiplicity: spin multiplicity 2S+1.
    smiles: SMILES of the molecule ("" if unknown).
    bonds: int [b, 2] atom index pairs (i < j), or None if no bond graph is known.
    bond_orders: float [b] (1, 1.5 aromatic, 2, 3), or None (then `bonds` is None too).
    energy: total energy, eV, or None.
    forces: float [n, 3], eV/Å, or None.
    is_equilibrium: True if `positions` is a minimum at `structure_fidelity` (the structure label).
    structure_fidelity: level of theory that produced `positions` ("" if unknown/experimental).
    label_fidelity: level of theory of `energy` and `forces` ("" if neither is present).
    ref_positions: float [n, 3], Å: reference structure at another level (evaluation sets), or None.
    ref_fidelity: level of theory of `ref_positions` ("" if absent).
    ref_energy: energy at `ref_positions` at `ref_fidelity`, eV, or None.
  """

  mol_id: str
  atomic_numbers: np.ndarray
  positions: np.ndarray
  charge: int = 0
  multiplicity: int = 1
  smiles: str = ""
  bonds: np.ndarray | None = None
  bond_orders: np.ndarray | None = None
  energy: float | None = None
  forces: np.ndarray | None = None
  is_equilibrium: bool = False
  structure_fidelity: str = ""
  label_fidelity: str = ""
  ref_positions: np.ndarray | None = None
  ref_fidelity: str = ""
  ref_energy: float | None = None

  @property
  def n_atoms(self) -> int:
    return int(self.atomic_numbers.shape[0])

  @property
  def n_bonds(self) -> int:
    return 0 if self.bonds is None else int(self.bonds.shape[0])

  def replace(self, **changes: Any) -> "MoleculeRecord":
    return dataclasses.replace(self, **changes)

  def validate(self, where: str = "") -> "MoleculeRecord":
    """Checks shapes, values and units plausibility; returns self or raises RecordError.

    Args:
      where: a human-readable location ("qm9.tar: dsgdb9nsd_000017.xyz") put in the message.
    """
    loc = f"{where or 'record'} (mol_id={self.mol_id!r})"

    def fail(msg: str, reason: str = "invalid_record"):
      raise RecordError(f"{loc}: {msg}", reason)

    z = np.asarray(self.atomic_numbers)
    if z.ndim != 1:
      fail(f"atomic_numbers must be 1-D, got shape {z.shape}")
    n = z.shape[0]
    if n == 0:
      fail("empty molecule (0 atoms)", "empty_molecule")
    if not np.issubdtype(z.dtype, np.integer):
      fail(f"atomic_numbers must be integers, got dtype {z.dtype}")
    bad = (z < 1) | (z > MAX_Z)
    if bad.any():
      fail(f"unknown element: atomic number {int(z[bad][0])} at atom {int(np.argmax(bad))}", "unknown_element")
    for name in ("positions", "forces", "ref_positions"):
      arr = getattr(self, name)
      if arr is None:
        continue
      arr = np.asarray(arr)
      if arr.shape != (n, 3):
        fail(f"{name} has shape {arr.shape}, expected ({n}, 3) for {n} atoms", "length_mismatch")
      if not np.isfinite(arr).all():
        i = int(np.argmax(~np.isfinite(arr).all(axis=1)))
        fail(f"{name} has NaN/inf at atom {i}", "non_finite")
    for name in ("energy", "ref_energy"):
      v = getattr(self, name)
      if v is not None and not np.isfinite(v):
        fail(f"{name} is {v}", "non_finite")
    for name, pos in (("positions", self.positions), ("ref_positions", self.ref_positions)):
      if pos is not None and n > 1:
        d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
        d[np.diag_indices(n)] = np.inf
        if d.min() < MIN_INTERATOMIC_DISTANCE:
          i, j = np.unravel_index(np.argmin(d), d.shape)
          fail(f"duplicate atoms in {name}: atoms {i} and {j} are {d[i, j]:.3g} Å apart", "duplicate_atoms")
    if (self.bonds is None) != (self.bond_orders is None):
      fail("bonds and bond_orders must be given together")
    if self.bonds is not None:
      b = np.asarray(self.bonds)
      if b.ndim != 2 or b.shape[1] != 2:
        fail(f"bonds must have shape (b, 2), got {b.shape}")
      if np.asarray(self.bond_orders).shape != (b.shape[0],):
        fail(f"bond_orders has shape {np.asarray(self.bond_orders).shape}, expected ({b.shape[0]},)")
      if b.size and (b.min() < 0 or b.max() >= n):
        fail(f"bond index out of range for {n} atoms")
      if b.size and (b[:, 0] == b[:, 1]).any():
        fail("bond from an atom to itself")
      if not np.isfinite(self.bond_orders).all() or (np.asarray(self.bond_orders) <= 0).any():
        fail("bond orders must be positive and finite")
    if self.multiplicity < 1:
      fail(f"multiplicity must be >= 1, got {self.multiplicity}")
    if (self.energy is not None or self.forces is not None) and not self.label_fidelity:
      fail("energy/forces given without a label_fidelity tag", "missing_fidelity")
    if self.ref_positions is not None and not self.ref_fidelity:
      fail("ref_positions given without a ref_fidelity tag")
    if self.ref_energy is not None and self.ref_positions is None:
      fail("ref_energy given without ref_positions")
    return self

  def to_json(self) -> dict[str, Any]:
    """A JSON-friendly dict with units spelled out (for `launch.inspect --records`)."""
    out: dict[str, Any] = {
        "mol_id": self.mol_id,
        "smiles": self.smiles,
        "n_atoms": self.n_atoms,
        "atomic_numbers": np.asarray(self.atomic_numbers).tolist(),
        "positions_angstrom": _json_array(self.positions),
        "charge": int(self.charge),
        "multiplicity": int(self.multiplicity),
        "is_equilibrium": bool(self.is_equilibrium),
        "structure_fidelity": self.structure_fidelity,
    }
    if self.bonds is not None:
      out["bonds"] = _json_array(self.bonds)
      out["bond_orders"] = _json_array(self.bond_orders)
    if self.energy is not None:
      out["energy_ev"] = float(self.energy)
    if self.forces is not None:
      out["forces_ev_per_angstrom"] = _json_array(self.forces)
    if self.energy is not None or self.forces is not None:
      out["label_fidelity"] = self.label_fidelity
    if self.ref_positions is not None:
      out["ref_positions_angstrom"] = _json_array(self.ref_positions)
      out["ref_fidelity"] = self.ref_fidelity
    if self.ref_energy is not None:
      out["ref_energy_ev"] = float(self.ref_energy)
    return out
