"""MMFF94 through RDKit: energy kcal/mol -> eV, forces = -gradient; relaxation RDKit then ASE BFGS."""

from __future__ import annotations

from typing import Any

import ase
import ase.calculators.calculator
import numpy as np
from rdkit import Chem
from rdkit.Chem import rdDetermineBonds
from rdkit.Chem import rdForceFieldHelpers

from consist import units
from consist.levels import base

# Elements with MMFF94 parameters for neutral organic molecules.
_MMFF_ELEMENTS = frozenset({1, 6, 7, 8, 9, 14, 15, 16, 17, 35, 53})


def molecule_graph(atomic_numbers: np.ndarray, positions: np.ndarray, charge: int,
                   bonds: Any) -> Chem.Mol:
  """An RDKit molecule with a conformer at `positions` (Å); see `Level` for `bonds`."""
  n = len(atomic_numbers)
  if isinstance(bonds, Chem.Mol):
    mol = Chem.Mol(bonds)
    got = [a.GetAtomicNum() for a in mol.GetAtoms()]
    if got != [int(z) for z in atomic_numbers]:
      raise ValueError(f"bond-graph molecule has atoms {got}, expected {list(atomic_numbers)}")
    mol.RemoveAllConformers()
  else:
    rw = Chem.RWMol()
    for z in atomic_numbers:
      rw.AddAtom(Chem.Atom(int(z)))
    mol = rw.GetMol()
  conf = Chem.Conformer(n)
  for i, p in enumerate(np.asarray(positions, dtype=np.float64)):
    conf.SetAtomPosition(i, p.tolist())
  mol.AddConformer(conf, assignId=True)
  if isinstance(bonds, Chem.Mol):
    return mol
  try:
    if bonds is None:
      rdDetermineBonds.DetermineBonds(mol, charge=int(charge))
    else:
      rw = Chem.RWMol(mol)
      for i, j in np.asarray(bonds, dtype=np.int64):
        rw.AddBond(int(i), int(j), Chem.BondType.SINGLE)
      mol = rw.GetMol()
      rdDetermineBonds.DetermineBondOrders(mol, charge=int(charge))
    Chem.SanitizeMol(mol)
  except (ValueError, RuntimeError) as e:
    raise base.LevelError(f"mmff94: could not perceive bond orders/charges: {e}") from e
  return mol


class MmffCalculator(ase.calculators.calculator.Calculator):
  """ASE calculator evaluating one RDKit MMFF94 force field (fixed atoms and bond graph)."""

  implemented_properties = ["energy", "forces"]

  def __init__(self, mol: Chem.Mol):
    super().__init__()
    self._mol = mol  # the force field points into this molecule's conformer: keep it alive
    props = rdForceFieldHelpers.MMFFGetMoleculeProperties(mol, mmffVariant="MMFF94")
    if props is None or not rdForceFieldHelpers.MMFFHasAllMoleculeParams(mol):
      raise base.UnsupportedElementError("mmff94: missing MMFF94 parameters for this molecule")
    self._ff = rdForceFieldHelpers.MMFFGetMoleculeForceField(mol, props, nonBondedThresh=100.0)

  def calculate(self, atoms=None, properties=("energy",), system_changes=ase.calculators.calculator.all_changes):
    super().calculate(atoms, properties, system_changes)
    flat = np.asarray(self.atoms.positions, dtype=np.float64).ravel().tolist()
    energy = self._ff.CalcEnergy(flat) * units.KCAL_PER_MOL_TO_EV
    grad = np.asarray(self._ff.CalcGrad(flat), dtype=np.float64).reshape(-1, 3)
    self.results = {"energy": energy, "free_energy": energy,
                    "forces": -grad * units.KCAL_PER_MOL_TO_EV}


class MmffLevel(base.Level):
  """The MMFF94 force field (RDKit). Closed-shell only; charged species need formal charges in `bonds`."""

  name = "mmff94"
  supported_elements = _MMFF_ELEMENTS

  def check(self, atomic_numbers, charge: int = 0, multiplicity: int = 1) -> None:
    super().check(atomic_numbers, charge, multiplicity)
    if multiplicity != 1:
      raise base.UnsupportedStateError(f"mmff94: open-shell (multiplicity {multiplicity}) unsupported")

  def _calculator(self, atomic_numbers, positions, charge, multiplicity, bonds):
    mol = molecule_graph(atomic_numbers, positions, charge, bonds)
    formal = sum(a.GetFormalCharge() for a in mol.GetAtoms())
    if formal != charge:
      raise base.UnsupportedStateError(
          f"mmff94: bond graph has formal charge {formal}, expected total charge {charge}")
    return MmffCalculator(mol)

  def relax(self, atomic_numbers, positions, charge: int = 0, multiplicity: int = 1,
            bonds: Any = None, *, fmax: float = 0.01, max_steps: int = 1000,
            hessian0: np.ndarray | None = None) -> base.RelaxResult:
    """RDKit's MMFF minimiser (fast), then ASE BFGS to the common fmax criterion."""
    atoms = self._atoms(atomic_numbers, positions, charge, multiplicity, bonds)
    ff = atoms.calc._ff  # pylint: disable=protected-access
    ff.Initialize()
    ff.Minimize(maxIts=max_steps, forceTol=1e-6, energyTol=1e-10)
    atoms.positions = np.asarray(ff.Positions(), dtype=np.float64).reshape(-1, 3)
    return base._ase_relax(self, atoms, fmax=fmax, max_steps=max_steps, hessian0=hessian0)  # pylint: disable=protected-access
