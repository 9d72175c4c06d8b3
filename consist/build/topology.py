"""Bond graph from coordinates (covalent radii), to reject relaxations that break or form bonds."""

from __future__ import annotations

import ase.data
import numpy as np
from rdkit import Chem

# Two atoms are bonded when closer than this factor times the sum of their covalent radii
# (Cordero et al. 2008, as in ase.data.covalent_radii).
BOND_TOLERANCE = 1.25


def coordinate_bonds(atomic_numbers: np.ndarray, positions: np.ndarray,
                     tolerance: float = BOND_TOLERANCE) -> set[tuple[int, int]]:
  """Pairs (i < j) closer than `tolerance` x (r_i + r_j); positions [n, 3] Å."""
  r = ase.data.covalent_radii[np.asarray(atomic_numbers)]
  pos = np.asarray(positions, dtype=np.float64)
  d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
  i, j = np.nonzero(np.triu(d < tolerance * (r[:, None] + r[None, :]), k=1))
  return set(zip(i.tolist(), j.tolist()))


def graph_bonds(mol: Chem.Mol) -> set[tuple[int, int]]:
  """Bonded pairs (i < j) of an RDKit molecule."""
  return {tuple(sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))) for b in mol.GetBonds()}


def topology_difference(mol: Chem.Mol, positions: np.ndarray,
                        tolerance: float = BOND_TOLERANCE) -> str:
  """"" if the coordinates' bond graph equals the molecule's, else a description of the change."""
  z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
  expected, found = graph_bonds(mol), coordinate_bonds(z, positions, tolerance)
  if expected == found:
    return ""
  broken, formed = sorted(expected - found), sorted(found - expected)
  return f"broken bonds {broken[:4]}, formed bonds {formed[:4]}"
