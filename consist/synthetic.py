"""A synthetic two-fidelity world on real molecular graphs, with exactly known minima.

Molecules: small organic molecules from SMILES (RDKit, explicit hydrogens, ETKDG 3D embedding,
seeded, then MMFF-relaxed so geometries are chemically sensible). Their geometry R* defines the
"accurate" level of theory: an elastic network of harmonic springs on every atom pair 1, 2 or 3
bonds apart (bond stretches, 1-3 Urey-Bradley angles, 1-4 torsion springs):

    E_acc(R) = sum_springs k/2 (|r_i - r_j| - d*_ij)^2,   d*_ij = |R*_i - R*_j|,

plus, on every atom quadruple that is coplanar in R* (a trigonal centre with its three neighbours,
and every bonded torsion a-b-c-d whose four atoms are coplanar), a planarity term

    k_p/2 (V - V*)^2,   V = (r_b - r_a) . ((r_c - r_a) x (r_d - r_a))   (Å^3, zero when coplanar),

V* = V(R*), |V*| < `PLANAR_TOLERANCE` (numerically zero for sp2 centres after MMFF; the energy is
reflection invariant up to k_p |V V*|: < 1e-4 eV at 0.05 Å kicks here).

Distance springs alone leave the out-of-plane motions of a planar molecule flat to second order
(they change distances only quadratically), so its minimum would not be unique and RMSDs to it
would be dominated by a direction no energy determines; with the planarity terms R* is an exact
global minimum (E = 0, forces 0) whose Hessian is zero only on the six rigid motions
(`tests/test_synthetic.py` checks it).

The "cheap" level uses the same terms with biased rest lengths (the known bias): bonds to
hydrogen +`CHEAP_H_BOND_BIAS`, bonds between heavy atoms +`CHEAP_HEAVY_BOND_BIAS` (relative);
1-3 and 1-4 rest lengths and the planarity terms unchanged. The conflicting rest lengths are
relaxed together (L-BFGS, float64, |F| < 1e-6 eV/Å) into the cheap minimum R_c — the cheap
"equilibrium structure" label, like an MMFF / PM6 geometry. Accurate energies and forces are
computed at R_c and at off-equilibrium structures (Gaussian kicks around R_c), like the single
points of the builder.

Energies are in eV, positions in Å, forces in eV/Å, all computed in float64.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from rdkit import Chem
from rdkit.Chem import AllChem

from consist.data.record import MoleculeRecord

DEFAULT_SMILES = ("CCO", "CC(=O)O", "C=CC=O", "CN", "OC=O", "CC#N")
# Spring constants (eV/Å^2) by topological distance 1 (bond), 2 (angle), 3 (torsion).
SPRING_CONSTANTS = {1: 25.0, 2: 6.0, 3: 1.5}
PLANARITY_CONSTANT = 2.0  # eV/Å^6: out-of-plane curvature ~ k_p |(r_c - r_a) x (r_d - r_a)|^2
PLANAR_TOLERANCE = 0.005  # Å^3: |V| in R* below which a quadruple counts as coplanar
CHEAP_H_BOND_BIAS = 0.06
CHEAP_HEAVY_BOND_BIAS = -0.04
ACCURATE, CHEAP = "synthetic-accurate", "synthetic-cheap"


@flax.struct.dataclass
class Springs:
  """Harmonic terms of one molecule, or of several packed into one batch (indices into positions).

  Pair springs k/2 (|r_i - r_j| - rest)^2: atoms i, j [S], k [S] eV/Å^2, rest [S] Å, and the
  graph of each, pair_graph [S]. Planarity terms k/2 (V - volume)^2 (see `signed_volume`): atoms
  quad [P, 4], k_plane [P] eV/Å^6, volume [P] Å^3, plane_graph [P].
  """

  i: np.ndarray
  j: np.ndarray
  k: np.ndarray
  rest: np.ndarray
  pair_graph: np.ndarray
  quad: np.ndarray
  k_plane: np.ndarray
  volume: np.ndarray
  plane_graph: np.ndarray


def signed_volume(positions_N3: jax.Array, quad_P4: jax.Array) -> jax.Array:
  """V [P] = (r_b - r_a) . ((r_c - r_a) x (r_d - r_a)), Å^3, of atom quadruples (a, b, c, d)."""
  r = positions_N3[quad_P4]
  ab, ac, ad = (r[:, n] - r[:, 0] for n in (1, 2, 3))
  return jnp.sum(ab * jnp.cross(ac, ad), axis=-1)


def spring_energy(positions_N3: jax.Array, springs: Springs, num_graphs: int) -> jax.Array:
  """Energy per graph [G], eV: pair springs plus planarity terms."""
  d = positions_N3[springs.i] - positions_N3[springs.j]
  r = jnp.sqrt(jnp.sum(d**2, axis=-1))
  pairs = jax.ops.segment_sum(0.5 * springs.k * (r - springs.rest) ** 2, springs.pair_graph,
                              num_segments=num_graphs)
  dv = signed_volume(positions_N3, springs.quad) - springs.volume
  return pairs + jax.ops.segment_sum(0.5 * springs.k_plane * dv**2, springs.plane_graph,
                                     num_segments=num_graphs)


@jax.jit
@jax.value_and_grad
def _molecule_energy(positions_N3: jax.Array, springs: Springs) -> jax.Array:
  return spring_energy(positions_N3, springs, 1)[0]


def _energy_and_forces_f64(positions: np.ndarray, springs: Springs) -> tuple[float, np.ndarray]:
  with jax.enable_x64(True):
    e, g = _molecule_energy(jnp.asarray(positions, jnp.float64),
                            jax.tree.map(jnp.asarray, springs))
    return float(e), -np.asarray(g, np.float64)


@dataclasses.dataclass(frozen=True)
class SyntheticMolecule:
  """One molecule of the world: graph, both spring sets and both exact minima (Å)."""

  smiles: str
  atomic_numbers: np.ndarray
  bonds: np.ndarray
  bond_orders: np.ndarray
  accurate: Springs
  cheap: Springs
  accurate_minimum: np.ndarray
  cheap_minimum: np.ndarray

  @property
  def n_atoms(self) -> int:
    return int(self.atomic_numbers.shape[0])

  def energy_and_forces(self, positions: np.ndarray, level: str = ACCURATE):
    """(energy eV, forces [n, 3] eV/Å) at `level` (ACCURATE or CHEAP), float64."""
    return _energy_and_forces_f64(positions, self.accurate if level == ACCURATE else self.cheap)


def _coplanar_quadruples(mol: Chem.Mol, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Atom quadruples [P, 4] coplanar in `positions`, and their volumes [P] Å^3: trigonal centres
  (centre first, then its three neighbours) and bonded torsions a-b-c-d."""
  neighbours = [[n.GetIdx() for n in a.GetNeighbors()] for a in mol.GetAtoms()]
  quads = [(a, *nbrs) for a, nbrs in enumerate(neighbours) if len(nbrs) == 3]
  for bond in mol.GetBonds():
    b, c = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
    quads += [(a, b, c, d) for a in neighbours[b] if a != c for d in neighbours[c]
              if d != b and d != a]
  quads = np.asarray(quads, np.int32).reshape(-1, 4)
  with jax.enable_x64(True):
    volume = np.asarray(signed_volume(jnp.asarray(positions, jnp.float64), jnp.asarray(quads)))
  planar = np.abs(volume) < PLANAR_TOLERANCE
  return quads[planar], volume[planar]


def _springs_from_geometry(mol: Chem.Mol, positions: np.ndarray) -> tuple[Springs, Springs]:
  """(accurate, cheap) terms: rest lengths and planarity of `positions`, cheap bonds biased."""
  topo = Chem.GetDistanceMatrix(mol)
  i, j = np.nonzero(np.triu((topo >= 1) & (topo <= 3)))
  order = topo[i, j].astype(int)
  k = np.asarray([SPRING_CONSTANTS[o] for o in order], np.float64)
  rest = np.linalg.norm(positions[i] - positions[j], axis=-1)
  z = np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()])
  has_h = (z[i] == 1) | (z[j] == 1)
  bias = np.where(order == 1, np.where(has_h, CHEAP_H_BOND_BIAS, CHEAP_HEAVY_BOND_BIAS), 0.0)
  quad, volume = _coplanar_quadruples(mol, positions)
  accurate = Springs(i.astype(np.int32), j.astype(np.int32), k, rest, np.zeros(i.shape, np.int32),
                     quad, np.full(volume.shape, PLANARITY_CONSTANT), volume,
                     np.zeros(volume.shape, np.int32))
  return accurate, accurate.replace(rest=rest * (1.0 + bias))


def _relax(positions: np.ndarray, springs: Springs) -> np.ndarray:
  """Minimum of the spring energy from `positions` (float64 L-BFGS), raising if not converged."""

  def fun(x):
    e, f = _energy_and_forces_f64(x.reshape(-1, 3), springs)
    return e, -f.ravel()

  res = scipy.optimize.minimize(fun, positions.ravel(), jac=True, method="L-BFGS-B",
                                options={"gtol": 1e-10, "ftol": 0.0, "maxiter": 10_000})
  out = res.x.reshape(-1, 3)
  fmax = np.abs(_energy_and_forces_f64(out, springs)[1]).max()
  if fmax > 1e-6:
    raise RuntimeError(f"synthetic world: cheap relaxation did not converge (max |F| {fmax:.2e} eV/Å)")
  return out


def make_molecule(smiles: str, seed: int = 0) -> SyntheticMolecule:
  mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
  if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
    raise ValueError(f"synthetic world: RDKit could not embed {smiles!r}")
  AllChem.MMFFOptimizeMolecule(mol)
  positions = mol.GetConformer().GetPositions().astype(np.float64)
  positions -= positions.mean(axis=0)
  accurate, cheap = _springs_from_geometry(mol, positions)
  bonds = np.asarray([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()], np.int64)
  orders = np.asarray([b.GetBondTypeAsDouble() for b in mol.GetBonds()], np.float64)
  return SyntheticMolecule(
      smiles=smiles, atomic_numbers=np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()], np.int64),
      bonds=bonds, bond_orders=orders, accurate=accurate, cheap=cheap,
      accurate_minimum=positions, cheap_minimum=_relax(positions, cheap))


@dataclasses.dataclass(frozen=True)
class SyntheticWorld:
  molecules: tuple[SyntheticMolecule, ...]

  def _record(self, index: int, positions: np.ndarray, *, equilibrium: bool) -> MoleculeRecord:
    mol = self.molecules[index]
    energy, forces = mol.energy_and_forces(positions, ACCURATE)
    return MoleculeRecord(
        mol_id=f"synthetic-{index}", atomic_numbers=mol.atomic_numbers, positions=positions,
        smiles=mol.smiles, bonds=mol.bonds, bond_orders=mol.bond_orders, energy=energy,
        forces=forces, is_equilibrium=equilibrium, structure_fidelity=CHEAP if equilibrium else "",
        label_fidelity=ACCURATE, ref_positions=mol.accurate_minimum, ref_fidelity=ACCURATE,
        ref_energy=0.0).validate(f"synthetic world, molecule {index} ({mol.smiles})")

  def equilibrium_records(self) -> list[MoleculeRecord]:
    """Per molecule: the cheap minimum (structure label) with accurate energy and forces there;
    `ref_positions` is the accurate minimum (for evaluation only)."""
    return [self._record(i, m.cheap_minimum, equilibrium=True) for i, m in enumerate(self.molecules)]

  def off_equilibrium_records(self, per_molecule: int, rng: np.random.Generator,
                              scales: Sequence[float] = (0.02, 0.05, 0.1)) -> list[MoleculeRecord]:
    """Cheap minima plus isotropic Gaussian kicks (std drawn from `scales`, Å), accurate labels."""
    out = []
    for i, mol in enumerate(self.molecules):
      for _ in range(per_molecule):
        kick = rng.normal(size=mol.cheap_minimum.shape) * rng.choice(np.asarray(scales))
        out.append(self._record(i, mol.cheap_minimum + kick, equilibrium=False))
    return out

  def springs_for(self, mol_indices: Sequence[int], level: str = ACCURATE) -> Springs:
    """Terms of molecules packed into one batch in this order (nodes contiguous, as
    `consist.data.batching.batch_records` packs them; graph g is the g-th molecule listed)."""
    parts, offset = [], 0
    for g, m in enumerate(mol_indices):
      mol = self.molecules[m]
      s = mol.accurate if level == ACCURATE else mol.cheap
      parts.append(s.replace(i=s.i + offset, j=s.j + offset, quad=s.quad + offset,
                             pair_graph=np.full(s.i.shape, g, np.int32),
                             plane_graph=np.full(s.k_plane.shape, g, np.int32)))
      offset += mol.n_atoms
    return jax.tree.map(lambda *x: np.concatenate(x), *parts)


def make_world(smiles: Sequence[str] = DEFAULT_SMILES, seed: int = 0) -> SyntheticWorld:
  return SyntheticWorld(tuple(make_molecule(s, seed) for s in smiles))
