"""ase.Atoms (from extxyz frames or ase.db rows) -> MoleculeRecord. ASE units are already eV and Å."""

from __future__ import annotations

from typing import Any, Mapping

import ase
import numpy as np

from consist.data.convert.report import BadRecord
from consist.data.record import MoleculeRecord

CHARGE_KEYS = ("charge", "total_charge")
MULTIPLICITY_KEYS = ("multiplicity", "spin_multiplicity")


def _lookup(info: Mapping[str, Any], keys: tuple[str, ...], default: Any) -> Any:
  for k in keys:
    if k in info:
      return info[k]
  return default


def _as_int(value: Any, name: str) -> int:
  number = float(value)
  if abs(number - round(number)) > 1e-3:
    raise BadRecord("parse_error", f"{name}={value!r} is not an integer")
  return int(round(number))


def _as_bool(value: Any, name: str) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)) and value in (0, 1):
    return bool(value)
  if isinstance(value, str) and value.lower() in ("t", "true", "f", "false", "1", "0"):
    return value.lower() in ("t", "true", "1")
  raise BadRecord("parse_error", f"{name}={value!r} is not a boolean")


def atoms_to_record(atoms: ase.Atoms, info: Mapping[str, Any], *, mol_id: str, energy: float | None,
                    forces: np.ndarray | None, fidelity: str, structure_fidelity: str) -> MoleculeRecord:
  """Builds a record from ASE atoms, their metadata (`info` / key-value pairs) and labels.

  Metadata keys read if present: mol_id, charge (or total_charge), multiplicity (or
  spin_multiplicity), smiles, is_equilibrium, and label_fidelity / structure_fidelity when the
  corresponding argument is empty.
  """
  if atoms.pbc.any():
    raise BadRecord("periodic", f"periodic cell (pbc={atoms.pbc.tolist()}); molecules only")
  label_fidelity = fidelity or str(info.get("label_fidelity", ""))
  if (energy is not None or forces is not None) and not label_fidelity:
    raise BadRecord("missing_fidelity", "energy/forces present but no level of theory: give "
                    "--fidelity (e.g. --fidelity=pbe/def2-svp) or a label_fidelity key")
  return MoleculeRecord(
      mol_id=str(info.get("mol_id", mol_id)),
      atomic_numbers=np.asarray(atoms.numbers, dtype=np.int32),
      positions=np.asarray(atoms.positions, dtype=np.float64),
      charge=_as_int(_lookup(info, CHARGE_KEYS, 0), "charge"),
      multiplicity=_as_int(_lookup(info, MULTIPLICITY_KEYS, 1), "multiplicity"),
      smiles=str(info.get("smiles", "")),
      energy=None if energy is None else float(energy),
      forces=None if forces is None else np.asarray(forces, dtype=np.float64),
      is_equilibrium=_as_bool(info.get("is_equilibrium", False), "is_equilibrium"),
      structure_fidelity=structure_fidelity or str(info.get("structure_fidelity", "")),
      label_fidelity=label_fidelity if (energy is not None or forces is not None) else "",
  )
