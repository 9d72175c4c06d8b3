"""Consensus selection: of C sampled candidate structures of a molecule, the one nearest the others.

One diffusion sample is one draw from the learned distribution of conformations, and on average it
lies as far from a reference minimum as two independent draws lie from each other. The medoid of C
draws, the candidate with the least summed RMSD to the other candidates, is the minimum-Bayes-risk
choice under that RMSD: a structure near the dense centre of the distribution rather than a random
point of it. The RMSD is symmetry-aware over the heavy atoms (all atoms for a molecule with fewer
than three heavy atoms), the metric the evaluation reports. Candidates whose bonds, perceived from
the coordinates alone, are not the molecule's graph (`consist.eval.structure.connectivity_valid`)
are passed over while any candidate is valid. Nothing here looks at a reference structure.
"""

from __future__ import annotations

import numpy as np

from consist.eval import structure

MIN_HEAVY_ATOMS = 3


def pairwise_rmsd(atomic_numbers: np.ndarray, bonds: np.ndarray, candidates_CN3: np.ndarray) -> np.ndarray:
  """[C, C] symmetry-aware RMSD (Å) between candidates [C, n, 3] (heavy atoms; see module doc)."""
  candidates = np.asarray(candidates_CN3, np.float64)
  sym = structure.graph_symmetry(atomic_numbers, bonds)
  heavy, heavy_perms = structure.heavy_atom_perms(atomic_numbers, sym)
  if heavy.shape[0] >= MIN_HEAVY_ATOMS:
    columns = [structure.symmetric_rmsd(candidates[:, heavy], c[heavy], heavy_perms) for c in candidates]
  else:
    columns = [structure.graph_symmetric_rmsd(candidates, c, sym) for c in candidates]
  d = np.stack(columns, axis=1)
  return 0.5 * (d + d.T)  # equal up to the alignment's rounding; made exactly symmetric


def medoid_index(atomic_numbers: np.ndarray, bonds: np.ndarray | None, candidates_CN3: np.ndarray,
                 charge: int = 0) -> int:
  """Index of the medoid of the candidates [C, n, 3] (Å), among the valid ones where any is."""
  candidates = np.asarray(candidates_CN3, np.float64)
  finite = np.isfinite(candidates).all(axis=(1, 2))
  if candidates.shape[0] == 1 or not finite.any():
    return 0
  if bonds is None:
    keep = finite
  else:
    keep = finite.copy()
    keep[finite] = structure.connectivity_valid(atomic_numbers, bonds, candidates[finite], charge)
    keep = keep if keep.any() else finite
  index = np.flatnonzero(keep)
  total = pairwise_rmsd(atomic_numbers, bonds, candidates[index]).sum(axis=1)
  return int(index[np.argmin(total)])
