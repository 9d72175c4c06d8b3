"""The level-of-theory interface: energy and forces in eV and eV/Å, relaxation to a force threshold.

Every level is reached through `consist.levels.get_level(name)`. Implementations wrap an ASE
calculator and relax with an ASE optimiser, so all levels share one definition of convergence:
max per-atom force norm <= `fmax` (eV/Å).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import Any, Sequence

import ase
import ase.data
import ase.calculators.calculator
import ase.optimize
import numpy as np

# Failure reasons the dataset builder records (one vocabulary for levels and builder).
REASON_ELEMENT = "element not supported by level"
REASON_STATE = "charged/open-shell unsupported"
REASON_SCF = "SCF not converged"
REASON_SETUP = "level setup failed"

# Smallest eigenvalue (eV/Å²) of an initial BFGS Hessian guess: rigid and soft modes start stiff
# enough that the first steps stay small (measured: ~3x fewer GFN2-xTB steps from MMFF minima).
HESSIAN0_FLOOR = 5.0


class LevelError(RuntimeError):
  """A level could not compute a molecule; `reason` is one of the REASON_* strings."""

  reason = REASON_SETUP


class UnsupportedElementError(LevelError):
  reason = REASON_ELEMENT


class UnsupportedStateError(LevelError):
  """The charge / spin multiplicity is not one the level can handle."""

  reason = REASON_STATE


class ScfNotConvergedError(LevelError):
  reason = REASON_SCF


@dataclasses.dataclass(frozen=True)
class RelaxResult:
  """A relaxation. positions float64 [n, 3] Å; energy eV; forces float64 [n, 3] eV/Å."""

  positions: np.ndarray
  energy: float
  forces: np.ndarray
  converged: bool
  n_steps: int

  @property
  def fmax(self) -> float:
    """Largest per-atom force norm, eV/Å."""
    return float(np.linalg.norm(self.forces, axis=1).max())


def element_symbol(z: int) -> str:
  return ase.data.chemical_symbols[int(z)]


class Level(abc.ABC):
  """One level of theory. Subclasses provide `supported_elements` and `_calculator`.

  `bonds` is the molecule's chemical graph where a level needs one (MMFF94): an RDKit `Chem.Mol`
  with the same atoms in the same order (carries bond orders and formal charges), or an int [b, 2]
  array of bonded pairs (bond orders then perceived for the given charge), or None (connectivity
  perceived from the coordinates). Quantum-chemical levels ignore it.
  """

  name: str
  supported_elements: frozenset[int]

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r})"

  @abc.abstractmethod
  def _calculator(self, atomic_numbers: np.ndarray, positions: np.ndarray, charge: int,
                  multiplicity: int, bonds: Any) -> ase.calculators.calculator.Calculator:
    """An ASE calculator for this molecule (energies eV, forces eV/Å)."""

  def check(self, atomic_numbers: Sequence[int], charge: int = 0, multiplicity: int = 1) -> None:
    """Raises UnsupportedElementError / UnsupportedStateError if the level cannot handle the input."""
    z = np.asarray(atomic_numbers)
    bad = sorted({int(a) for a in z if int(a) not in self.supported_elements})
    if bad:
      raise UnsupportedElementError(
          f"{self.name}: element(s) {', '.join(element_symbol(a) for a in bad)} not supported")
    n_electrons = int(z.sum()) - int(charge)
    if multiplicity < 1 or (n_electrons - (multiplicity - 1)) % 2 or multiplicity - 1 > n_electrons:
      raise UnsupportedStateError(
          f"{self.name}: multiplicity {multiplicity} impossible with {n_electrons} electrons")

  def _atoms(self, atomic_numbers, positions, charge, multiplicity, bonds) -> ase.Atoms:
    z = np.asarray(atomic_numbers, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.float64)
    if pos.shape != (z.shape[0], 3):
      raise ValueError(f"positions shape {pos.shape} does not match {z.shape[0]} atoms")
    self.check(z, charge, multiplicity)
    atoms = ase.Atoms(numbers=z, positions=pos)
    atoms.calc = self._calculator(z, pos, int(charge), int(multiplicity), bonds)
    return atoms

  def energy_forces(self, atomic_numbers, positions, charge: int = 0, multiplicity: int = 1,
                    bonds: Any = None) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces float64 [n, 3] (eV/Å) at `positions` (Å)."""
    atoms = self._atoms(atomic_numbers, positions, charge, multiplicity, bonds)
    return _evaluate(self, atoms)

  def hessian(self, atomic_numbers, positions, charge: int = 0, multiplicity: int = 1,
              bonds: Any = None, *, step: float = 1e-3) -> np.ndarray:
    """Cartesian Hessian float64 [3n, 3n] (eV/Å²) by central differences of the forces (step Å)."""
    atoms = self._atoms(atomic_numbers, positions, charge, multiplicity, bonds)
    x0 = np.array(atoms.positions)
    n = len(atoms)
    hess = np.empty((3 * n, 3 * n))
    for k in range(3 * n):
      f = []
      for sign in (1.0, -1.0):
        x = x0.copy()
        x[k // 3, k % 3] += sign * step
        atoms.positions = x
        f.append(_evaluate(self, atoms)[1].ravel())
      hess[k] = -(f[0] - f[1]) / (2 * step)
    return 0.5 * (hess + hess.T)

  def relax(self, atomic_numbers, positions, charge: int = 0, multiplicity: int = 1,
            bonds: Any = None, *, fmax: float = 0.01, max_steps: int = 1000,
            hessian0: np.ndarray | None = None) -> RelaxResult:
    """Relaxes with ASE's BFGS until every atomic force norm is <= fmax (eV/Å).

    hessian0: optional initial Hessian guess [3n, 3n] (eV/Å²), e.g. a cheaper level's Hessian at
      the start; eigenvalues are floored at HESSIAN0_FLOOR. Without it BFGS starts from 70 * I.
    """
    atoms = self._atoms(atomic_numbers, positions, charge, multiplicity, bonds)
    return _ase_relax(self, atoms, fmax=fmax, max_steps=max_steps, hessian0=hessian0)


@contextlib.contextmanager
def _level_errors(level: Level):
  """Turns a calculator's failure into a LevelError with a reason."""
  try:
    yield
  except LevelError:
    raise
  except (ase.calculators.calculator.CalculationFailed,
          ase.calculators.calculator.InputError) as e:
    if "not converged" in str(e).lower():
      raise ScfNotConvergedError(f"{level.name}: {e}") from e
    raise LevelError(f"{level.name}: {e}") from e


def _evaluate(level: Level, atoms: ase.Atoms) -> tuple[float, np.ndarray]:
  with _level_errors(level):
    energy = float(atoms.get_potential_energy())
    forces = np.array(atoms.get_forces(), dtype=np.float64)
  if not np.isfinite(energy) or not np.isfinite(forces).all():
    raise ScfNotConvergedError(f"{level.name}: non-finite energy or forces")
  return energy, forces


def _ase_relax(level: Level, atoms: ase.Atoms, *, fmax: float, max_steps: int,
               hessian0: np.ndarray | None = None) -> RelaxResult:
  opt = ase.optimize.BFGS(atoms, logfile=None, maxstep=0.1)
  if hessian0 is not None:
    evals, evecs = np.linalg.eigh(0.5 * (hessian0 + hessian0.T))
    opt.H0 = (evecs * np.maximum(evals, HESSIAN0_FLOOR)) @ evecs.T
  with _level_errors(level):
    opt.run(fmax=fmax, steps=max_steps)
  energy, forces = _evaluate(level, atoms)
  converged = bool(np.linalg.norm(forces, axis=1).max() <= fmax)
  return RelaxResult(positions=np.array(atoms.positions, dtype=np.float64), energy=energy,
                     forces=forces, converged=converged, n_steps=int(opt.nsteps))
