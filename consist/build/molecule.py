"""The per-molecule pipeline of the multi-fidelity builder (BRIEF section 4).

SMILES -> seeded ETKDG embedding -> cheap-level relaxation (the equilibrium-structure label) ->
accurate energy + forces there -> off-equilibrium samples (thermal normal-mode displacements on the
cheap-level Hessian) with accurate energy + forces -> for evaluation splits, the accurate-level
relaxation from the cheap structure (the reference minimum). Every structure is rounded to float32
before its labels are computed, so stored labels are exactly those of the stored coordinates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import numpy as np
from rdkit import Chem
from rdkit import RDLogger
from rdkit.Chem import rdDistGeom

from consist import units
from consist.build import topology
from consist.data.record import MoleculeRecord
from consist.levels import Level, LevelError, get_level

REASON_SMILES = "invalid smiles"
REASON_EMBED = "embedding failed"
REASON_NOT_CONVERGED = "relaxation not converged"
REASON_TOPOLOGY = "topology changed"


@dataclasses.dataclass(frozen=True)
class BuildSettings:
  """Everything that determines a molecule's result (recorded in the dataset attrs).

  Attributes:
    cheap / accurate: level names (`consist.levels.get_level`).
    accurate_options: keyword options of the accurate level (e.g. {"accuracy": 1.0}).
    seed: global seed; each molecule's seed is a hash of (seed, SMILES).
    cheap_fmax / ref_fmax: relaxation thresholds, max atomic force norm in eV/Å, of the cheap
      structure and of the accurate reference minimum. The latter is checked again at the stored
      float32 coordinates with a fresh SCF (relaxation continued to ref_fmax / 2 if that check fails).
    max_steps: optimiser steps per relaxation.
    offeq_splits: splits whose molecules may get off-equilibrium samples.
    offeq_fraction: fraction of those molecules (chosen by hash) that get them.
    offeq_temperatures: one sample per temperature (K): x ~ N(0, kT H^-1) over the vibrational
      normal modes of the cheap-level Hessian H at the cheap minimum.
    offeq_min_curvature: eigenvalue floor (eV/Å²) capping soft-mode amplitudes at sqrt(kT / floor).
    ref_splits: splits whose molecules get accurate reference minima.
    bond_tolerance: covalent-radius factor of the topology check.
  """

  cheap: str = "mmff94"
  accurate: str = "gfn2-xtb"
  accurate_options: tuple[tuple[str, Any], ...] = ()
  seed: int = 0
  cheap_fmax: float = 0.005
  ref_fmax: float = 0.01
  max_steps: int = 2000
  offeq_splits: tuple[str, ...] = ("train",)
  offeq_fraction: float = 1.0
  offeq_temperatures: tuple[float, ...] = (150.0, 300.0, 600.0)
  offeq_min_curvature: float = 2.0
  ref_splits: tuple[str, ...] = ("val", "test")
  bond_tolerance: float = topology.BOND_TOLERANCE

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["accurate_options"] = dict(self.accurate_options)
    return out


@dataclasses.dataclass
class MoleculeResult:
  """Records of one molecule (empty on failure), or the failure reason and its detail."""

  mol_id: str
  smiles: str
  split: str
  records: list[MoleculeRecord]
  failure: str = ""
  detail: str = ""
  seconds: float = 0.0


class _Failure(Exception):

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


def molecule_seed(seed: int, smiles: str) -> int:
  return int.from_bytes(hashlib.sha256(f"{seed}:{smiles}".encode()).digest()[:4], "little") >> 1


def hash_fraction(seed: int, smiles: str, what: str) -> float:
  """A deterministic number in [0, 1) per (seed, molecule, purpose)."""
  h = hashlib.sha256(f"{seed}:{what}:{smiles}".encode()).digest()[:8]
  return int.from_bytes(h, "little") / 2.0**64


def _f32(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def thermal_displacements(hessian: np.ndarray, temperatures, rng: np.random.Generator, *,
                          min_curvature: float, n_rigid: int) -> list[np.ndarray]:
  """One displacement [n, 3] (Å) per temperature, from N(0, kT H^-1) over vibrational modes.

  The `n_rigid` modes of smallest |eigenvalue| (translations, rotations) are left out; eigenvalues
  below `min_curvature` (eV/Å², including small negative ones) are raised to it.
  """
  evals, evecs = np.linalg.eigh(hessian)
  keep = np.argsort(np.abs(evals))[n_rigid:]
  k = np.maximum(evals[keep], min_curvature)
  modes = evecs[:, keep]
  out = []
  for temperature in temperatures:
    kt = units.BOLTZMANN_EV_PER_K * float(temperature)
    amplitude = rng.standard_normal(k.shape[0]) * np.sqrt(kt / k)
    out.append((modes @ amplitude).reshape(-1, 3))
  return out


class MoleculeBuilder:
  """Runs the pipeline for one molecule at a time (levels are created once per process)."""

  def __init__(self, settings: BuildSettings):
    self.settings = settings
    self.cheap: Level = get_level(settings.cheap)
    self.accurate: Level = get_level(settings.accurate, **dict(settings.accurate_options))
    RDLogger.DisableLog("rdApp.*")

  def __call__(self, smiles: str, mol_id: str, split: str) -> MoleculeResult:
    start = time.perf_counter()
    try:
      records = self._build(smiles, mol_id, split)
      result = MoleculeResult(mol_id, smiles, split, records)
    except _Failure as f:
      result = MoleculeResult(mol_id, smiles, split, [], f.reason, f.detail)
    except LevelError as e:
      result = MoleculeResult(mol_id, smiles, split, [], e.reason, str(e))
    result.seconds = time.perf_counter() - start
    return result

  def _relax(self, level: Level, mol: Chem.Mol, z, pos, charge, mult, fmax: float,
             hessian0: np.ndarray | None = None) -> np.ndarray:
    s = self.settings
    res = level.relax(z, pos, charge, mult, bonds=mol, fmax=fmax, max_steps=s.max_steps,
                      hessian0=hessian0)
    if not res.converged:
      raise _Failure(REASON_NOT_CONVERGED,
                     f"{level.name}: max force {res.fmax:.3g} eV/Å after {res.n_steps} steps")
    change = topology.topology_difference(mol, res.positions, s.bond_tolerance)
    if change:
      raise _Failure(REASON_TOPOLOGY, f"{level.name} relaxation: {change}")
    return _f32(res.positions)

  def _build(self, smiles: str, mol_id: str, split: str) -> list[MoleculeRecord]:
    s = self.settings
    mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
      raise _Failure(REASON_SMILES, f"RDKit cannot parse {smiles!r}")
    mol = Chem.AddHs(mol)
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    charge = Chem.GetFormalCharge(mol)
    mult = 1 + sum(a.GetNumRadicalElectrons() for a in mol.GetAtoms())
    self.cheap.check(z, charge, mult)
    self.accurate.check(z, charge, mult)

    seed = molecule_seed(s.seed, smiles)
    params = rdDistGeom.ETKDGv3()
    params.randomSeed = seed
    if rdDistGeom.EmbedMolecule(mol, params) != 0:
      raise _Failure(REASON_EMBED, f"ETKDGv3 (seed {seed}) found no conformer")
    embedded = mol.GetConformer().GetPositions()

    cheap_pos = self._relax(self.cheap, mol, z, embedded, charge, mult, s.cheap_fmax)
    energy, forces = self.accurate.energy_forces(z, cheap_pos, charge, mult, bonds=mol)
    bonds = np.array(sorted(topology.graph_bonds(mol)), dtype=np.int32).reshape(-1, 2)
    order_of = {tuple(sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))): b.GetBondTypeAsDouble()
                for b in mol.GetBonds()}
    bond_orders = np.array([order_of[(int(i), int(j))] for i, j in bonds], dtype=np.float32)
    base = MoleculeRecord(mol_id=mol_id, atomic_numbers=z.astype(np.uint8), positions=cheap_pos,
                          charge=charge, multiplicity=mult, smiles=smiles, bonds=bonds,
                          bond_orders=bond_orders, label_fidelity=self.accurate.name)
    eq = base.replace(energy=energy, forces=_f32(forces), is_equilibrium=True,
                      structure_fidelity=self.cheap.name)

    want_offeq = (split in s.offeq_splits
                  and hash_fraction(s.seed, smiles, "offeq") < s.offeq_fraction)
    hess = None
    if want_offeq or split in s.ref_splits:
      hess = self.cheap.hessian(z, cheap_pos, charge, mult, bonds=mol)
    if split in s.ref_splits:
      # The cheap Hessian seeds BFGS: same minimum, ~3x fewer accurate-level steps.
      ref_pos = self._relax(self.accurate, mol, z, cheap_pos, charge, mult, s.ref_fmax, hess)
      ref_energy, ref_forces = self.accurate.energy_forces(z, ref_pos, charge, mult, bonds=mol)
      ref_fmax = float(np.linalg.norm(ref_forces, axis=1).max())
      if ref_fmax > s.ref_fmax:
        # BFGS stops just below fmax; float32 rounding and a fresh SCF guess can tip the check
        # over it. Continue from the stored coordinates to half the threshold.
        ref_pos = self._relax(self.accurate, mol, z, ref_pos, charge, mult, 0.5 * s.ref_fmax, hess)
        ref_energy, ref_forces = self.accurate.energy_forces(z, ref_pos, charge, mult, bonds=mol)
        ref_fmax = float(np.linalg.norm(ref_forces, axis=1).max())
      if ref_fmax > s.ref_fmax:
        raise _Failure(REASON_NOT_CONVERGED, f"{self.accurate.name}: max force {ref_fmax:.3g} eV/Å "
                       "at the float32-rounded minimum")
      eq = eq.replace(ref_positions=ref_pos, ref_fidelity=self.accurate.name, ref_energy=ref_energy)
    records = [eq.validate(f"{mol_id} {smiles}")]

    if want_offeq:
      n_rigid = 5 if _is_linear(cheap_pos) else 6
      rng = np.random.default_rng([seed, 1])
      for dx in thermal_displacements(hess, s.offeq_temperatures, rng,
                                      min_curvature=s.offeq_min_curvature, n_rigid=n_rigid):
        pos = _f32(cheap_pos.astype(np.float64) + dx)
        e, f = self.accurate.energy_forces(z, pos, charge, mult, bonds=mol)
        records.append(base.replace(positions=pos, energy=e, forces=_f32(f)).validate(
            f"{mol_id} {smiles} (off-equilibrium)"))
    return records


def _is_linear(positions: np.ndarray) -> bool:
  x = positions - positions.mean(axis=0)
  sv = np.linalg.svd(x.astype(np.float64), compute_uv=False)
  return len(positions) < 3 or sv[1] < 1e-3 * sv[0]
