"""Bond graphs from RDKit molecules: index pairs (i < j) and orders (aromatic = 1.5)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import rdDetermineBonds


@contextlib.contextmanager
def quiet_rdkit() -> Iterator[None]:
  """Silences RDKit's log while active: its failures are reported as record errors or notes."""
  blocker = rdBase.BlockLogs()
  try:
    yield
  finally:
    del blocker


def bonds_of(mol: Chem.Mol) -> tuple[np.ndarray, np.ndarray]:
  """(bonds int [b, 2] with i < j, bond_orders float [b]) of an RDKit molecule, in RDKit's order."""
  pairs = [sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx())) for b in mol.GetBonds()]
  orders = [b.GetBondTypeAsDouble() for b in mol.GetBonds()]
  return (np.asarray(pairs, dtype=np.int32).reshape(-1, 2), np.asarray(orders, dtype=np.float32))


def mol_from_coordinates(atomic_numbers: np.ndarray, positions: np.ndarray) -> Chem.RWMol:
  """An RDKit molecule with the given atoms (no bonds) and one 3D conformer (Å)."""
  mol = Chem.RWMol()
  for z in atomic_numbers:
    mol.AddAtom(Chem.Atom(int(z)))
  conf = Chem.Conformer(len(atomic_numbers))
  for i, xyz in enumerate(np.asarray(positions, dtype=np.float64)):
    conf.SetAtomPosition(i, xyz.tolist())
  mol.AddConformer(conf, assignId=True)
  return mol


def bonds_from_coordinates(atomic_numbers: np.ndarray, positions: np.ndarray, charge: int = 0
                           ) -> tuple[np.ndarray | None, np.ndarray | None, str]:
  """Bond graph perceived from 3D coordinates with RDKit's `rdDetermineBonds`.

  Tries bond orders (`DetermineBonds`), then connectivity only (`DetermineConnectivity`, every
  order set to 1), then gives up.

  Returns:
    (bonds, bond_orders, quality) with quality "orders", "connectivity_only" or "none" (bonds and
    orders are None then).
  """
  with quiet_rdkit():
    try:
      mol = mol_from_coordinates(atomic_numbers, positions)
      rdDetermineBonds.DetermineBonds(mol, charge=charge)
      return (*bonds_of(mol), "orders")
    except (ValueError, RuntimeError):
      pass
    try:
      mol = mol_from_coordinates(atomic_numbers, positions)
      rdDetermineBonds.DetermineConnectivity(mol)
      bonds, orders = bonds_of(mol)
      return bonds, np.ones_like(orders), "connectivity_only"
    except (ValueError, RuntimeError):
      return None, None, "none"
