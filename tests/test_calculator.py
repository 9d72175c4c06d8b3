"""ConsistCalculator: forces = -dE/dR, BFGS and Langevin through ASE, no recompilation per molecule size."""

import ase
import ase.calculators.calculator
import ase.md
import ase.optimize
import numpy as np
import pytest
from ase import units

from consist.calculator import ConsistCalculator
from consist.predict import molecules
from predict_model import model, workdir  # noqa: E402,F401  (the shared smoke-model fixtures)


def _atoms(smiles: str, seed: int = 0) -> ase.Atoms:
  """MMFF94 structure of a SMILES as ase.Atoms (no bond graph attached)."""
  mol = molecules.from_smiles(smiles)
  return ase.Atoms(numbers=mol.atomic_numbers, positions=molecules.start_positions(mol, "refine", seed))


def _compiled(calc: ConsistCalculator) -> int:
  return calc.model._energy_forces._cache_size()  # pylint: disable=protected-access


def test_forces_are_minus_the_energy_gradient(model):
  atoms = _atoms("CC(=O)N")
  atoms.positions += np.random.default_rng(0).normal(scale=0.05, size=atoms.positions.shape)
  atoms.calc = ConsistCalculator(model)
  forces = atoms.get_forces()
  assert forces.shape == (len(atoms), 3) and forces.dtype == np.float64
  h = 5e-3
  x0 = atoms.positions.copy()
  # The largest components, so a wrong sign or factor cannot hide under float32 noise.
  for flat in np.argsort(-np.abs(forces).ravel())[:4]:
    i, k = divmod(int(flat), 3)
    energies = []
    for sign in (1.0, -1.0):
      x = x0.copy()
      x[i, k] += sign * h
      atoms.positions = x
      energies.append(atoms.get_potential_energy())
    numeric = -(energies[0] - energies[1]) / (2 * h)
    assert abs(forces[i, k]) > 0.02, "model forces too small to test the sign"
    assert numeric == pytest.approx(forces[i, k], rel=0.05, abs=5e-3), (i, k)
  atoms.positions = x0


def test_bfgs_langevin_and_new_sizes_without_recompiling(workdir):
  calc = ConsistCalculator.from_workdir(workdir)
  atoms = _atoms("CCO")
  atoms.positions += np.random.default_rng(1).normal(scale=0.1, size=atoms.positions.shape)
  atoms.calc = calc
  e_start = atoms.get_potential_energy()
  assert _compiled(calc) == 1  # the first call compiles bucket 0

  opt = ase.optimize.BFGS(atoms, logfile=None)
  assert opt.run(fmax=0.05, steps=500), "BFGS did not reach fmax on the learned surface"
  assert np.linalg.norm(atoms.get_forces(), axis=1).max() <= 0.05
  assert atoms.get_potential_energy() < e_start

  dyn = ase.md.Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.02, fixcm=False,
                        rng=np.random.default_rng(2))
  energies = []
  dyn.attach(lambda: energies.append(atoms.get_potential_energy()), interval=1)
  dyn.run(100)
  assert len(energies) == 101 and np.isfinite(energies).all()
  assert len(set(energies)) > 90  # the positions moved, and every step was evaluated
  assert _compiled(calc) == 1

  # Other molecules: bond graph perceived again, same compiled bucket while they fit it.
  bucket0, bucket1 = calc.model.buckets.budgets
  for smiles in ("c1ccccc1", "CC(=O)Nc1ccc(O)cc1"):
    other = _atoms(smiles)
    other.calc = calc
    assert np.isfinite(other.get_potential_energy())
    assert len(other) * (len(other) - 1) <= bucket0.n_edge
    assert _compiled(calc) == 1
  assert 1.5 in set(calc.bond_graph[1].tolist())  # paracetamol's aromatic ring, perceived from 3D

  # Alkanes too large for bucket 0 compile bucket 1 once.
  for n_carbon in (16, 17):
    alkane = _atoms("C" * n_carbon)
    assert bucket0.n_edge < len(alkane) * (len(alkane) - 1) <= bucket1.n_edge
    alkane.calc = calc
    assert np.isfinite(alkane.get_forces()).all()
    assert _compiled(calc) == 2


def test_bond_graph_from_info_or_constructor_is_used(model):
  atoms = _atoms("C=CC=O")
  perceived = ConsistCalculator(model)
  atoms.calc = perceived
  e_perceived = atoms.get_potential_energy()
  bonds, orders = perceived.bond_graph
  assert sorted(orders.tolist()) == [1.0] * 5 + [2.0, 2.0]  # acrolein: two double bonds

  single = np.ones_like(orders)
  by_info = atoms.copy()
  by_info.info.update(bonds=bonds, bond_orders=single)
  by_info.calc = ConsistCalculator(model)
  by_arg = atoms.copy()
  by_arg.calc = ConsistCalculator(model, bonds=bonds, bond_orders=single)
  e_info, e_arg = by_info.get_potential_energy(), by_arg.get_potential_energy()
  np.testing.assert_array_equal(by_info.calc.bond_graph[1], single)
  assert e_info == pytest.approx(e_arg, abs=1e-6)
  # The energy model (consist.models.mace) reads geometry only: bond orders, used by the structure
  # model, do not change the energy.
  assert e_info == pytest.approx(e_perceived, abs=1e-6)


def test_unknown_element_and_oversized_molecule_are_named(model):
  uranium = ase.Atoms("UO2", positions=[[0, 0, 0], [0, 0, 1.8], [0, 0, -1.8]])
  uranium.info.update(bonds=[[0, 1], [0, 2]], bond_orders=[2.0, 2.0])
  uranium.calc = ConsistCalculator(model)
  with pytest.raises(ase.calculators.calculator.CalculatorError, match=r"element\(s\) U not in the training data"):
    uranium.get_potential_energy()
  big = _atoms("C" * 30)
  big.calc = ConsistCalculator(model)
  with pytest.raises(ase.calculators.calculator.CalculatorError, match=r"92 atoms.*largest shape bucket"):
    big.get_potential_energy()
