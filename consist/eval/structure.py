"""Structure accuracy against a reference minimum (BRIEF section 5), in numpy.

Shapes: n atoms, b bonds, K samples per molecule, P atom permutations. Positions in Å.

- `kabsch_rmsd`: RMSD after the optimal *proper* rotation and translation (no reflection: a chiral
  structure is not aligned onto its mirror image), optionally weighted per atom.
- `symmetric_rmsd`: minimum of `kabsch_rmsd` over atom permutations; `graph_symmetric_rmsd` takes
  them from the molecular graph's automorphisms (permutations preserving elements and bonds).
- `bond_length_mae`, `distance_matrix_mae`: internal-coordinate errors in the given atom order.
- `molecule_structure_metrics`: all of the above for K samples of one molecule, as the mean and the
  min over the samples (`rmsd_mean`, `rmsd_min`, ...).

Graph symmetry. The all-atom automorphism group grows as (3!)^(methyl groups): neopentane has
31,104 automorphisms, two tert-butyl groups 3.4 million. It factors into the automorphisms of the
"core" graph (every atom but the terminal hydrogens, each labelled with its hydrogen count; 24 for
neopentane) times the permutations of the hydrogens on each core atom. Groups of at most
EXACT_GROUP_LIMIT are enumerated and minimised over exactly; beyond that, for each core
automorphism the hydrogens are assigned optimally per core atom for the current alignment,
alternating with re-alignment until the assignment is stable (a local minimum over the hydrogen
permutations, found from the core alignment). Core groups beyond MAX_AUTOMORPHISMS are truncated to
the first ones RDKit finds (a warning is logged; the RMSD is then an upper bound).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import logging

import numpy as np
from rdkit import Chem

EXACT_GROUP_LIMIT = 5_000
MAX_AUTOMORPHISMS = 10_000
# Alternations of hydrogen assignment and alignment in the large-group case.
_MAX_ASSIGN_ROUNDS = 10
# Permutations aligned at once (bounds memory to ~_PERM_CHUNK * K * n * 3 floats).
_PERM_CHUNK = 1024

STRUCTURE_METRICS = ("rmsd", "rmsd_heavy", "rmsd_sym", "rmsd_heavy_sym", "bond_mae", "dmae")


def _weights(weights, n: int) -> np.ndarray:
  w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
  if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
    raise ValueError(f"weights must be non-negative [n={n}] with a positive sum, got {w}")
  return w / w.sum()


def _kabsch(pred: np.ndarray, ref: np.ndarray, weights) -> tuple[np.ndarray, np.ndarray]:
  """(pred aligned onto ref [..., n, 3], weighted RMSD [...]); pred and ref broadcast."""
  pred = np.asarray(pred, dtype=np.float64)
  ref = np.asarray(ref, dtype=np.float64)
  n = ref.shape[-2]
  if ref.ndim < 2 or ref.shape[-1] != 3 or pred.shape[-2:] != (n, 3):
    raise ValueError(f"pred shape {pred.shape} and reference shape {ref.shape} are not [..., n, 3]")
  w = _weights(weights, n)
  p_centre = np.einsum("i,...ij->...j", w, pred)[..., None, :]
  q_centre = np.einsum("i,...ij->...j", w, ref)[..., None, :]
  p, q = pred - p_centre, ref - q_centre
  cov = np.swapaxes(p * w[:, None], -1, -2) @ q  # [..., 3, 3] = P^T W Q
  u, _, vt = np.linalg.svd(cov)
  # Proper rotation: flip the smallest singular direction when the optimum would be a reflection.
  d = np.sign(np.linalg.det(np.swapaxes(vt, -1, -2) @ np.swapaxes(u, -1, -2)))  # det(V U^T) = +-1
  u[..., :, 2] *= d[..., None]
  aligned = p @ (u @ vt) + q_centre  # row vectors: p @ R ~ q
  return aligned, np.sqrt(np.sum((aligned - ref) ** 2, axis=-1) @ w)


def kabsch_align(pred: np.ndarray, ref: np.ndarray,
                 weights: np.ndarray | None = None) -> np.ndarray:
  """`pred` [..., n, 3] rotated (proper rotation) and translated onto `ref` [..., n, 3].

  weights: optional non-negative [n]; the weighted centroid is matched and the weighted squared
    deviation minimised (atoms of weight 0 do not influence the fit).
  """
  return _kabsch(pred, ref, weights)[0]


def kabsch_rmsd(pred: np.ndarray, ref: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
  """Weighted RMSD (Å) after optimal proper rotation + translation; pred [..., n, 3] -> [...]."""
  return _kabsch(pred, ref, weights)[1]


def _graph_mol(atomic_numbers: np.ndarray, bonds: np.ndarray, labels: np.ndarray | None = None):
  """An RDKit mol holding only elements (+ optional integer labels as isotopes) and connectivity.

  Bond orders are left out on purpose: Kekulé bond orders break real symmetries (the two O of a
  carboxylate, the ring of a Kekulé benzene), and with explicit hydrogens the connectivity and the
  elements fix the chemistry.
  """
  mol = Chem.RWMol()
  for k, z in enumerate(atomic_numbers):
    atom = Chem.Atom(int(z))
    atom.SetNoImplicit(True)
    if labels is not None:
      atom.SetIsotope(int(labels[k]))
    mol.AddAtom(atom)
  for i, j in bonds:
    mol.AddBond(int(i), int(j), Chem.BondType.SINGLE)
  mol = mol.GetMol()
  mol.UpdatePropertyCache(strict=False)
  return mol


def _check_graph(atomic_numbers, bonds) -> tuple[np.ndarray, np.ndarray]:
  z = np.asarray(atomic_numbers, dtype=np.int64)
  b = np.zeros((0, 2), np.int64) if bonds is None else np.asarray(bonds, np.int64).reshape(-1, 2)
  if z.ndim != 1 or (b.size and (b.min() < 0 or b.max() >= z.shape[0])):
    raise ValueError(f"bonds {b.tolist()} do not index {z.shape[0]} atoms")
  return z, b


def automorphisms(atomic_numbers, bonds, *, labels=None,
                  max_count: int = MAX_AUTOMORPHISMS) -> tuple[np.ndarray, bool]:
  """Permutations of the atoms that preserve elements (and `labels`) and the bond graph.

  Returns (perms int [P, n] with the identity first, truncated): `ref[perm]` is an equally valid
  atom order for the molecule; `truncated` is True when the group is larger than `max_count`.
  """
  z, b = _check_graph(atomic_numbers, bonds)
  mol = _graph_mol(z, b, labels)
  matches = mol.GetSubstructMatches(mol, uniquify=False, useChirality=False,
                                    maxMatches=max_count + 1)
  truncated = len(matches) > max_count
  perms = np.asarray(matches[:max_count], dtype=np.int64).reshape(-1, z.shape[0])
  identity = np.arange(z.shape[0])
  keep = ~(perms == identity).all(axis=1)
  return np.concatenate([identity[None], perms[keep]]), truncated


@dataclasses.dataclass(frozen=True)
class GraphSymmetry:
  """The automorphism group of a molecular graph, factored into core and hydrogen permutations.

  core: int [c] atoms other than terminal hydrogens (H with one bond, to a non-H atom).
  core_perms: int [P, c] automorphisms of the core graph (atoms labelled by element and hydrogen
    count), as positions into `core`; identity first.
  hydrogens: per core position, the int array of its terminal hydrogens.
  order: size of the all-atom group, P * prod(k_i!) over the hydrogen counts k_i.
  truncated: the core group had more than the `max_count` it was enumerated with.
  """

  core: np.ndarray
  core_perms: np.ndarray
  hydrogens: tuple[np.ndarray, ...]
  order: int
  truncated: bool

  def atom_perm(self, core_perm: np.ndarray) -> np.ndarray:
    """The all-atom permutation [n] of one core automorphism, hydrogens kept in index order."""
    n = self.core.shape[0] + sum(h.shape[0] for h in self.hydrogens)
    perm = np.empty(n, np.int64)
    perm[self.core] = self.core[core_perm]
    for i, j in enumerate(core_perm):
      perm[self.hydrogens[i]] = self.hydrogens[j]
    return perm

  def all_perms(self) -> np.ndarray:
    """Every all-atom automorphism [order, n] (enumerate only for small `order`)."""
    groups = [h for h in self.hydrogens if h.shape[0] > 1]
    out = []
    for core_perm in self.core_perms:
      base = self.atom_perm(core_perm)
      for choice in itertools.product(*(itertools.permutations(range(h.shape[0])) for h in groups)):
        perm = base.copy()
        for h, order in zip(groups, choice):
          perm[h] = base[h[list(order)]]
        out.append(perm)
    return np.asarray(out)


def graph_symmetry(atomic_numbers, bonds, *, max_count: int = MAX_AUTOMORPHISMS) -> GraphSymmetry:
  """The factored automorphism group of the graph (elements + connectivity, bond orders ignored)."""
  z, b = _check_graph(atomic_numbers, bonds)
  n = z.shape[0]
  neighbours = [[] for _ in range(n)]
  for i, j in b:
    neighbours[i].append(j)
    neighbours[j].append(i)
  terminal = np.array([z[i] == 1 and len(nb) == 1 and z[nb[0]] != 1
                       for i, nb in enumerate(neighbours)], dtype=bool)
  core = np.flatnonzero(~terminal)
  position = -np.ones(n, np.int64)
  position[core] = np.arange(core.shape[0])
  hydrogens = tuple(np.array(sorted(j for j in neighbours[c] if terminal[j]), np.int64)
                    for c in core)
  core_bonds = position[b][(position[b] >= 0).all(axis=1)] if b.size else b
  labels = np.array([h.shape[0] + 1 for h in hydrogens])
  core_perms, truncated = automorphisms(z[core], core_bonds, labels=labels, max_count=max_count)
  order = core_perms.shape[0] * int(np.prod([math.factorial(h.shape[0]) for h in hydrogens]))
  return GraphSymmetry(core, core_perms, hydrogens, order, truncated)


def heavy_atom_perms(atomic_numbers, sym: GraphSymmetry) -> tuple[np.ndarray, np.ndarray]:
  """(heavy-atom indices [h], their graph automorphisms [P, h] as permutations of 0..h-1)."""
  heavy = np.flatnonzero(np.asarray(atomic_numbers) > 1)
  # Heavy atoms are core atoms; their automorphisms are the core ones restricted to them.
  in_core = np.searchsorted(sym.core, heavy)
  return heavy, np.unique(np.searchsorted(heavy, sym.core[sym.core_perms[:, in_core]]), axis=0)


def symmetric_rmsd(pred: np.ndarray, ref: np.ndarray, perms: np.ndarray) -> np.ndarray:
  """min over perms [P, n] of kabsch_rmsd(pred, ref[perm]); pred [..., n, 3] -> [...] (Å)."""
  pred = np.asarray(pred, dtype=np.float64)[..., None, :, :]
  ref = np.asarray(ref, dtype=np.float64)
  best = None
  for start in range(0, perms.shape[0], _PERM_CHUNK):
    rmsd = kabsch_rmsd(pred, ref[perms[start:start + _PERM_CHUNK]]).min(axis=-1)
    best = rmsd if best is None else np.minimum(best, rmsd)
  return best


def _assigned_rmsd(pred: np.ndarray, ref: np.ndarray, sym: GraphSymmetry,
                   base: np.ndarray) -> np.ndarray:
  """RMSD [K] of pred [K, n, 3] against ref[perm], perm = `base` with hydrogens reassigned per core
  atom to the nearest-by-permutation positions, alternating with re-alignment from the core fit."""
  k = pred.shape[0]
  groups = [(h, np.array(list(itertools.permutations(range(h.shape[0])))))
            for h in sym.hydrogens if h.shape[0] > 1]
  core_weights = np.zeros(pred.shape[1])
  core_weights[sym.core] = 1.0
  perm = np.tile(base, (k, 1))
  aligned = kabsch_align(pred, ref[base], core_weights)
  best = np.full(k, np.inf)
  for _ in range(_MAX_ASSIGN_ROUNDS):
    new = perm.copy()
    for h, orders in groups:
      targets = ref[base[h][orders]]  # [k!, m, 3]: candidate positions of the group's m hydrogens
      cost = np.sum((aligned[:, None, h] - targets[None]) ** 2, axis=(-1, -2))  # [K, k!]
      new[:, h] = base[h][orders[np.argmin(cost, axis=1)]]
    aligned, rmsd = _kabsch(pred, ref[new], None)
    best = np.minimum(best, rmsd)
    if np.array_equal(new, perm):
      break
    perm = new
  return best


def graph_symmetric_rmsd(pred: np.ndarray, ref: np.ndarray, sym: GraphSymmetry) -> np.ndarray:
  """Symmetry-corrected all-atom RMSD [K] of pred [K, n, 3] (see the module docstring)."""
  if sym.order <= EXACT_GROUP_LIMIT:
    return symmetric_rmsd(pred, ref, sym.all_perms())
  return np.min([_assigned_rmsd(pred, ref, sym, sym.atom_perm(p)) for p in sym.core_perms], axis=0)


def bond_length_mae(pred: np.ndarray, ref: np.ndarray, bonds: np.ndarray) -> np.ndarray:
  """Mean |d_pred - d_ref| over bonds (Å); pred [..., n, 3] -> [...]; NaN without bonds."""
  b = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
  if b.shape[0] == 0:
    return np.full(np.shape(pred)[:-2], np.nan)
  d_pred = np.linalg.norm(pred[..., b[:, 0], :] - pred[..., b[:, 1], :], axis=-1)
  d_ref = np.linalg.norm(ref[b[:, 0]] - ref[b[:, 1]], axis=-1)
  return np.mean(np.abs(d_pred - d_ref), axis=-1)


def distance_matrix_mae(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """Mean |D_pred - D_ref| over atom pairs i < j (Å); pred [..., n, 3] -> [...]; NaN for 1 atom."""
  n = np.shape(ref)[0]
  if n < 2:
    return np.full(np.shape(pred)[:-2], np.nan)
  i, j = np.triu_indices(n, k=1)
  d_pred = np.linalg.norm(pred[..., i, :] - pred[..., j, :], axis=-1)
  d_ref = np.linalg.norm(ref[i] - ref[j], axis=-1)
  return np.mean(np.abs(d_pred - d_ref), axis=-1)


def sample_structure_metrics(atomic_numbers, bonds, pred, ref, *,
                             max_automorphisms: int = MAX_AUTOMORPHISMS) -> dict[str, np.ndarray]:
  """Every metric of STRUCTURE_METRICS per sample: pred [K, n, 3] (or [n, 3]) -> {name: [K]}.

  Heavy-atom metrics are NaN for a molecule without heavy atoms.
  """
  z, b = _check_graph(atomic_numbers, bonds)
  pred = np.asarray(pred, dtype=np.float64)
  pred = pred[None] if pred.ndim == 2 else pred
  ref = np.asarray(ref, dtype=np.float64)
  if pred.ndim != 3 or pred.shape[1:] != (z.shape[0], 3) or ref.shape != (z.shape[0], 3):
    raise ValueError(f"expected pred [K, {z.shape[0]}, 3] and ref [{z.shape[0]}, 3], "
                     f"got {pred.shape} and {ref.shape}")
  sym = graph_symmetry(z, b, max_count=max_automorphisms)
  if sym.truncated:
    logging.warning("molecule with %d atoms has more than %d core graph automorphisms; "
                    "symmetry-corrected RMSD is an upper bound", z.shape[0], max_automorphisms)
  heavy, heavy_perms = heavy_atom_perms(z, sym)
  nan = np.full(pred.shape[0], np.nan)
  has_heavy = heavy.shape[0] > 0
  return {
      "rmsd": kabsch_rmsd(pred, ref),
      "rmsd_heavy": kabsch_rmsd(pred[:, heavy], ref[heavy]) if has_heavy else nan,
      "rmsd_sym": graph_symmetric_rmsd(pred, ref, sym),
      "rmsd_heavy_sym": (symmetric_rmsd(pred[:, heavy], ref[heavy], heavy_perms) if has_heavy
                         else nan),
      "bond_mae": bond_length_mae(pred, ref, b),
      "dmae": distance_matrix_mae(pred, ref),
  }


def aggregate_samples(per_sample: dict[str, np.ndarray]) -> dict[str, float]:
  """{name: [K]} -> {name_mean, name_min} over K samples, ignoring NaN ones (NaN if all are)."""
  out = {}
  for name, values in per_sample.items():
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    out[f"{name}_mean"] = float(finite.mean()) if finite.size else float("nan")
    out[f"{name}_min"] = float(finite.min()) if finite.size else float("nan")
  return out


def molecule_structure_metrics(atomic_numbers, bonds, pred, ref, *,
                               max_automorphisms: int = MAX_AUTOMORPHISMS) -> dict[str, float]:
  """STRUCTURE_METRICS of K samples of one molecule as `<metric>_mean` and `<metric>_min` over K."""
  return aggregate_samples(sample_structure_metrics(atomic_numbers, bonds, pred, ref,
                                                    max_automorphisms=max_automorphisms))


def connectivity_valid(atomic_numbers: np.ndarray, bonds: np.ndarray | None,
                       samples_KN3: np.ndarray, charge: int = 0) -> np.ndarray:
  """bool [K]: the bonds RDKit perceives from each sample's coordinates alone
  (`rdDetermineBonds.DetermineConnectivity`, covalent radii) are exactly the graph `bonds` [b, 2]."""
  from rdkit.Chem import rdDetermineBonds  # pylint: disable=g-import-not-at-top

  expected = set() if bonds is None else {tuple(sorted(map(int, b))) for b in np.asarray(bonds)}
  out = np.zeros(samples_KN3.shape[0], bool)
  for k, positions in enumerate(np.asarray(samples_KN3, np.float64)):
    mol = Chem.RWMol()
    for z in atomic_numbers:
      mol.AddAtom(Chem.Atom(int(z)))
    conformer = Chem.Conformer(len(atomic_numbers))
    for i, p in enumerate(positions):
      conformer.SetAtomPosition(i, p.tolist())
    mol.AddConformer(conformer, assignId=True)
    try:
      rdDetermineBonds.DetermineConnectivity(mol, charge=charge)
    except (ValueError, RuntimeError):
      continue
    found = {tuple(sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))) for b in mol.GetBonds()}
    out[k] = found == expected
  return out
