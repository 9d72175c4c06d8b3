"""Kohn-Sham DFT through PySCF for any "<functional>/<basis>" string (the optional `dft` extra).

PySCF is imported lazily, so consist works without it. Energies hartree -> eV, gradients
hartree/bohr -> eV/Å. Closed-shell molecules use RKS, open-shell UKS.
"""

from __future__ import annotations

from typing import Any

import ase.calculators.calculator
import numpy as np

from consist import units
from consist.levels import base


def _pyscf():
  try:
    import pyscf  # pylint: disable=g-import-not-at-top
    from pyscf import dft, gto  # pylint: disable=g-import-not-at-top,unused-import
    from pyscf import grad  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise base.LevelError(
        "DFT levels need PySCF: pip install 'consist[dft]' (or pip install pyscf)") from e
  return pyscf


class PyscfCalculator(ase.calculators.calculator.Calculator):
  """ASE calculator: one PySCF KS-DFT single point + analytic gradient per geometry."""

  implemented_properties = ["energy", "forces"]

  def __init__(self, *, xc: str, basis: str, charge: int, multiplicity: int, conv_tol: float,
               max_cycle: int, grid_level: int, level_name: str):
    super().__init__()
    self.xc, self.basis, self.charge, self.multiplicity = xc, basis, charge, multiplicity
    self.conv_tol, self.max_cycle, self.grid_level = conv_tol, max_cycle, grid_level
    self.level_name = level_name

  def calculate(self, atoms=None, properties=("energy",), system_changes=ase.calculators.calculator.all_changes):
    super().calculate(atoms, properties, system_changes)
    pyscf = _pyscf()
    geometry = [(base.element_symbol(z), tuple(p)) for z, p in zip(self.atoms.numbers, self.atoms.positions)]
    try:
      mol = pyscf.gto.M(atom=geometry, basis=self.basis, charge=self.charge,
                        spin=self.multiplicity - 1, unit="Angstrom", verbose=0)
    except (KeyError, RuntimeError, ValueError) as e:
      raise base.UnsupportedElementError(f"{self.level_name}: basis {self.basis!r}: {e}") from e
    mf = (pyscf.dft.RKS(mol) if self.multiplicity == 1 else pyscf.dft.UKS(mol))
    mf.xc = self.xc
    mf.conv_tol = self.conv_tol
    mf.max_cycle = self.max_cycle
    mf.grids.level = self.grid_level
    energy = mf.kernel()
    if not mf.converged:
      raise base.ScfNotConvergedError(f"{self.level_name}: SCF not converged in {self.max_cycle} cycles")
    gradient = mf.nuc_grad_method()
    gradient.grid_response = True  # forces are then the exact derivative of the quadrature energy
    grad = gradient.kernel()
    self.results = {
        "energy": float(energy) * units.HARTREE_TO_EV,
        "free_energy": float(energy) * units.HARTREE_TO_EV,
        "forces": -np.asarray(grad, dtype=np.float64) * units.HARTREE_PER_BOHR_TO_EV_PER_ANGSTROM,
    }


class DftLevel(base.Level):
  """`<functional>/<basis>`, e.g. "b3lyp/6-31g*" (lower case, as the fidelity tag).

  Args:
    name: functional and basis separated by "/".
    conv_tol: SCF energy convergence, hartree.
    max_cycle: SCF iterations before ScfNotConvergedError.
    grid_level: PySCF DFT integration grid level (0-9).
  """

  supported_elements = frozenset(range(1, 87))

  def __init__(self, name: str, *, conv_tol: float = 1e-10, max_cycle: int = 100, grid_level: int = 3):
    xc, sep, basis = name.lower().partition("/")
    if not sep or not xc or not basis:
      raise ValueError(f"DFT level must be '<functional>/<basis>', got {name!r}")
    self.name = f"{xc}/{basis}"
    self.xc, self.basis = xc, basis
    self.conv_tol, self.max_cycle, self.grid_level = conv_tol, max_cycle, grid_level

  def _calculator(self, atomic_numbers, positions, charge, multiplicity, bonds: Any):
    _pyscf()
    return PyscfCalculator(xc=self.xc, basis=self.basis, charge=charge, multiplicity=multiplicity,
                           conv_tol=self.conv_tol, max_cycle=self.max_cycle,
                           grid_level=self.grid_level, level_name=self.name)
