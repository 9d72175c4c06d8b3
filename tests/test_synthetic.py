"""The synthetic two-fidelity world: exact minima, a unique accurate minimum, the known bias."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consist import synthetic
from consist.eval.structure import kabsch_rmsd


@pytest.fixture(scope="module")
def world():
  return synthetic.make_world()


def _hessian_blocks(world, level):
  """Per molecule, the Hessian [3n, 3n] (eV/Å^2) of its `level` energy at its `level` minimum:
  all molecules packed into one batch, one float64 Hessian, cut into its diagonal blocks."""
  springs = jax.tree.map(jnp.asarray, world.springs_for(range(len(world.molecules)), level))
  minima = [m.accurate_minimum if level == synthetic.ACCURATE else m.cheap_minimum
            for m in world.molecules]
  with jax.enable_x64(True):
    energy = lambda x: jnp.sum(synthetic.spring_energy(x.reshape(-1, 3), springs, len(minima)))
    hess = np.asarray(jax.hessian(energy)(jnp.asarray(np.concatenate(minima).ravel())))
  ends = 3 * np.cumsum([m.n_atoms for m in world.molecules])
  return [hess[a:b, a:b] for a, b in zip(np.r_[0, ends[:-1]], ends)], minima


@pytest.mark.parametrize("level", [synthetic.ACCURATE, synthetic.CHEAP])
def test_minima_are_stationary_and_unique_up_to_rigid_motion(world, level):
  """Forces vanish at each level's minimum, and its Hessian is positive definite except on the
  six rigid motions: no flat internal direction (planar molecules would have n - 3 of them
  without the planarity terms), so RMSD to the minimum measures something an energy determines."""
  for mol, hess, minimum in zip(world.molecules, *_hessian_blocks(world, level)):
    energy, forces = mol.energy_and_forces(minimum, level)
    assert np.abs(forces).max() < 1e-6, mol.smiles
    eig = np.linalg.eigvalsh(hess)
    assert np.all(np.abs(eig[:6]) < 1e-4), (mol.smiles, eig[:7])  # rigid (|F| < 1e-6 at R_c)
    assert eig[6] > 0.2, f"{mol.smiles}: softest internal mode {eig[6]:.3g} eV/Å^2"
    if level == synthetic.ACCURATE:
      assert energy == pytest.approx(0.0, abs=1e-12)


def test_cheap_minima_carry_the_bond_bias(world):
  """Cheap minima carry the known bias: X-H bonds longer, heavy-atom bonds shorter, a few
  hundredths of an Å RMSD from the accurate minima, and a positive accurate energy there."""
  for mol in world.molecules:
    i, j = mol.accurate.i, mol.accurate.j
    bonded = mol.accurate.k == synthetic.SPRING_CONSTANTS[1]
    has_h = (mol.atomic_numbers[i] == 1) | (mol.atomic_numbers[j] == 1)
    length = lambda r: np.linalg.norm(r[i] - r[j], axis=-1)
    stretch = length(mol.cheap_minimum) - length(mol.accurate_minimum)
    assert np.all(stretch[bonded & has_h] > 0.02), mol.smiles
    assert np.all(stretch[bonded & ~has_h] < 0.0), mol.smiles
    assert 0.02 < kabsch_rmsd(mol.cheap_minimum, mol.accurate_minimum) < 0.2
    e_acc, _ = mol.energy_and_forces(mol.cheap_minimum, synthetic.ACCURATE)
    assert e_acc > 0.01, mol.smiles


def test_planarity_terms_sit_on_coplanar_quadruples_and_are_reflection_invariant(world):
  """Every planar molecule gets planarity terms, each coplanar in R*; the energy is invariant under
  reflection to 1e-4 eV (a model with O(3)-invariant energies can represent it)."""
  rng = np.random.default_rng(0)
  for mol in world.molecules:
    volume = np.asarray(synthetic.signed_volume(jnp.asarray(mol.accurate_minimum),
                                                jnp.asarray(mol.accurate.quad)))
    assert np.all(np.abs(volume) < synthetic.PLANAR_TOLERANCE)
    kicked = mol.cheap_minimum + 0.05 * rng.normal(size=mol.cheap_minimum.shape)
    mirrored = kicked * np.array([1.0, 1.0, -1.0])
    assert abs(mol.energy_and_forces(kicked)[0] - mol.energy_and_forces(mirrored)[0]) < 1e-4
  planar = [m.smiles for m in world.molecules if len(m.accurate.quad)]
  assert {"CC(=O)O", "C=CC=O", "OC=O"} <= set(planar)
