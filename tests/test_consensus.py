"""Consensus selection of sampled structures (consist.consensus): the medoid by symmetry-aware RMSD,
blind to rigid motions and to swapping symmetry-equivalent atoms, passing over broken candidates."""

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem
from scipy.spatial.transform import Rotation

from consist import consensus


@pytest.fixture(scope="module")
def isobutanol():
  """(atomic numbers [n], bonds [b, 2], MMFF94 positions [n, 3] Å): two equivalent methyls."""
  mol = Chem.AddHs(Chem.MolFromSmiles("CC(C)CO"))
  AllChem.EmbedMolecule(mol, randomSeed=7)
  AllChem.MMFFOptimizeMolecule(mol)
  z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
  bonds = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()])
  methyls = [a.GetIdx() for a in mol.GetAtoms()
             if a.GetAtomicNum() == 6 and sum(n.GetAtomicNum() == 1 for n in a.GetNeighbors()) == 3]
  return z, bonds, mol.GetConformer().GetPositions(), methyls


def _rigid(x, seed):
  return x @ Rotation.random(random_state=seed).as_matrix().T + np.array([1.0, -2.0, 0.5])


def test_pairwise_rmsd_ignores_rigid_motion_and_equivalent_atoms(isobutanol):
  z, bonds, x, (m1, m2) = isobutanol
  swapped = x.copy()
  swapped[[m1, m2]] = x[[m2, m1]]  # the two methyl carbons exchanged: the same structure
  moved = x.copy()
  moved[m1] += [0.0, 0.0, 0.3]
  d = consensus.pairwise_rmsd(z, bonds, np.stack([x, _rigid(x, 0), _rigid(swapped, 1), moved]))
  np.testing.assert_allclose(d, d.T)
  np.testing.assert_allclose(d[:3, :3], 0.0, atol=1e-6)
  heavy = int((z > 1).sum())
  assert np.all(d[3, :3] > 0.3 / np.sqrt(heavy) * 0.5)  # the moved atom is seen


def test_medoid_is_the_candidate_between_the_others(isobutanol):
  z, bonds, x, _ = isobutanol
  shift = np.random.default_rng(0).normal(size=x.shape) * 0.05
  candidates = np.stack([x + shift, x - shift, _rigid(x, 2), x + 2.5 * shift])
  assert consensus.medoid_index(z, bonds, candidates) == 2
  assert consensus.medoid_index(z, bonds, candidates[:1]) == 0


def test_medoid_passes_over_candidates_whose_bonds_are_not_the_graph(isobutanol):
  z, bonds, x, _ = isobutanol
  broken = x.copy()
  h = int(np.flatnonzero(z == 1)[0])
  broken[h] += 3.0  # a hydrogen torn off: perceived bonds differ from the graph
  candidates = np.stack([broken, broken, _rigid(x, 3)])
  assert consensus.medoid_index(z, bonds, candidates) == 2
  # with no valid candidate, the medoid of all of them; a non-finite candidate never
  further = broken.copy()
  further[h] += 1.0
  assert consensus.medoid_index(z, bonds, np.stack([further, _rigid(broken, 4), broken])) == 1
  shift = np.random.default_rng(1).normal(size=x.shape) * 0.05
  assert consensus.medoid_index(z, bonds, np.stack([np.full_like(x, np.nan), x + shift, x, x - shift])) == 2
