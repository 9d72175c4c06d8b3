"""Levels of theory: forces = -dE/dR by finite differences, relaxation to fmax, bad input, stored labels."""

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import rdDistGeom

from consist.data.bundled import SMOKE_DATASET
from consist.levels import (LevelError, ScfNotConvergedError, UnsupportedElementError,
                            UnsupportedStateError, get_level)


def _embedded(smiles: str, seed: int = 7):
  mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
  assert rdDistGeom.EmbedMolecule(mol, randomSeed=seed) == 0
  z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
  return mol, z, mol.GetConformer().GetPositions()


def _fd_forces(level, z, pos, bonds, h):
  """Central finite differences of the energy: F = -dE/dR, float64 [n, 3] eV/Å."""
  f = np.zeros_like(pos)
  for i in range(pos.shape[0]):
    for k in range(3):
      plus, minus = pos.copy(), pos.copy()
      plus[i, k] += h
      minus[i, k] -= h
      f[i, k] = -(level.energy_forces(z, plus, bonds=bonds)[0]
                  - level.energy_forces(z, minus, bonds=bonds)[0]) / (2 * h)
  return f


@pytest.mark.parametrize("name,options,perceive_bonds,tol", [
    ("mmff94", {}, False, 2e-4),
    ("mmff94", {}, True, 2e-4),
    ("gfn1-xtb", {"accuracy": 0.01}, False, 2e-4),
    ("gfn2-xtb", {"accuracy": 0.01}, False, 2e-4),
])
def test_forces_are_minus_energy_gradient(name, options, perceive_bonds, tol):
  # Methyl acetate with an off-equilibrium geometry (ETKDG, unrelaxed): forces are large.
  mol, z, pos = _embedded("COC(C)=O")
  level = get_level(name, **options)
  bonds = None if perceive_bonds else mol
  energy, forces = level.energy_forces(z, pos, bonds=bonds)
  assert forces.dtype == np.float64 and forces.shape == pos.shape
  assert np.abs(forces).max() > 0.1, "geometry should be off-equilibrium for a meaningful test"
  fd = _fd_forces(level, z, pos, bonds, h=1e-3)
  np.testing.assert_allclose(forces, fd, atol=tol, err_msg=f"{name}: F != -dE/dR")
  assert abs(forces.sum(axis=0)).max() < 1e-3, "net force of an isolated molecule must vanish"


@pytest.mark.slow  # ~10 CPU-s of PySCF
def test_dft_forces_are_minus_energy_gradient():
  pytest.importorskip("pyscf", reason="PySCF (the 'dft' extra) is not installed")
  level = get_level("b3lyp/sto-3g")
  z = np.array([8, 1, 1])
  pos = np.array([[0.0, 0.0, 0.1], [0.0, 0.8, -0.45], [0.05, -0.75, -0.5]])
  energy, forces = level.energy_forces(z, pos)
  assert -2100 < energy < -2000, f"H2O B3LYP/STO-3G total energy {energy} eV is implausible"
  np.testing.assert_allclose(forces, _fd_forces(level, z, pos, None, h=1e-3), atol=1e-4)
  res = level.relax(z, pos, fmax=0.01)
  assert res.converged and res.fmax <= 0.01
  oh = np.linalg.norm(res.positions[1:] - res.positions[0], axis=1)
  assert np.all((oh > 0.95) & (oh < 1.05)), f"O-H bond lengths {oh} Å at the B3LYP/STO-3G minimum"


@pytest.mark.parametrize("name", ["mmff94", "gfn2-xtb"])
def test_relax_reaches_fmax_and_lowers_energy(name):
  mol, z, pos = _embedded("CC(=O)Nc1ccccc1")
  level = get_level(name)
  e0, _ = level.energy_forces(z, pos, bonds=mol)
  res = level.relax(z, pos, bonds=mol, fmax=0.01)
  assert res.converged
  e, f = level.energy_forces(z, res.positions, bonds=mol)
  assert np.linalg.norm(f, axis=1).max() <= 0.01
  assert e == pytest.approx(res.energy, abs=1e-6) and e < e0  # SCF restart vs fresh guess


def test_hessian_seeded_relaxation_reaches_same_minimum():
  mol, z, pos = _embedded("CCOC(=O)C")
  cheap, accurate = get_level("mmff94"), get_level("gfn2-xtb")
  start = cheap.relax(z, pos, bonds=mol, fmax=0.005).positions
  hess = cheap.hessian(z, start, bonds=mol)
  np.testing.assert_allclose(hess, hess.T)
  assert np.sort(np.linalg.eigvalsh(hess))[6] > 0, "a minimum has a positive vibrational spectrum"
  plain = accurate.relax(z, start, fmax=0.005)
  seeded = accurate.relax(z, start, fmax=0.005, hessian0=hess)
  assert plain.converged and seeded.converged
  assert seeded.energy == pytest.approx(plain.energy, abs=2e-4)
  assert seeded.n_steps < plain.n_steps


def test_unsupported_inputs_raise_specific_errors():
  z, pos = np.array([11, 17]), np.array([[0.0, 0, 0], [2.4, 0, 0]])
  with pytest.raises(UnsupportedElementError, match="Na"):
    get_level("mmff94").energy_forces(z, pos)
  with pytest.raises(UnsupportedElementError, match="U"):
    get_level("gfn2-xtb").energy_forces(np.array([92, 9]), pos)
  _, zm, pm = _embedded("C")
  with pytest.raises(UnsupportedStateError):
    get_level("gfn2-xtb").energy_forces(zm, pm, multiplicity=2)  # 10 electrons, doublet
  with pytest.raises(UnsupportedStateError, match="open-shell"):
    get_level("mmff94").check(zm, 1, 2)
  with pytest.raises(ScfNotConvergedError) as info:
    get_level("gfn2-xtb", max_iterations=1).energy_forces(zm, pm)
  assert info.value.reason == "SCF not converged"
  assert issubclass(ScfNotConvergedError, LevelError)
  with pytest.raises(ValueError, match="unknown level"):
    get_level("pm7")


def test_stored_labels_are_reproduced_by_the_level():
  """Acceptance: 20 random training structures of the smoke set, recomputed with the level."""
  from consist.data.store import open_dataset  # pylint: disable=g-import-not-at-top
  ds = open_dataset(SMOKE_DATASET)
  level = get_level(ds.attrs["levels"]["accurate"])
  train = ds["train"]
  rng = np.random.default_rng(0)
  for i in rng.choice(len(train), size=min(20, len(train)), replace=False):
    r = train[int(i)]
    assert r.label_fidelity == level.name and r.positions.dtype == np.float32
    energy, forces = level.energy_forces(r.atomic_numbers, r.positions.astype(np.float64),
                                         r.charge, r.multiplicity)
    assert abs(energy - r.energy) < 1e-4, f"{r.mol_id}: stored energy {r.energy}, recomputed {energy}"
    np.testing.assert_allclose(r.forces, forces, atol=1e-3, err_msg=r.mol_id)
