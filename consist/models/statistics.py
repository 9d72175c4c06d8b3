"""Training-data statistics the energy model is built with (MACE's scale, shift and neighbour count).

`resolve_energy_config` fills `EnergyModelConfig.avg_num_neighbors`, `scale` and `shift` from an
evenly spaced sample of the training split, after the float64 per-element reference is subtracted:
  avg_num_neighbors: mean number of other atoms within the model's cutoff;
  scale: RMS of the force components (eV/Å), so the model's per-atom output is O(1);
  shift: median per-atom energy left by the reference (eV/atom), ~0 with a least-squares reference
    (the median, so one corrupt label cannot move every prediction).
The values are stored in the run's config, so a resumed run, a stage-2 run and inference rebuild the
same function (`consist.train` takes them from the checkpoint it continues from).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from consist.data.record import MoleculeRecord
from consist.data.reference import EnergyReference
from consist.models.config import EnergyModelConfig


def data_statistics(records: Sequence[MoleculeRecord], reference: EnergyReference,
                    cutoff: float) -> dict[str, float]:
  """{"avg_num_neighbors", "scale", "shift"} over `records` (those with forces / energies)."""
  neighbors, atoms = 0, 0
  force_sq, force_n = 0.0, 0
  per_atom = []
  for r in records:
    pos = np.asarray(r.positions, np.float64)
    d2 = np.sum((pos[:, None] - pos[None]) ** 2, axis=-1)
    neighbors += int(np.sum(d2 < cutoff**2)) - len(pos)
    atoms += len(pos)
    if r.forces is not None:
      force_sq += float(np.sum(np.asarray(r.forces, np.float64) ** 2))
      force_n += np.asarray(r.forces).size
    if r.energy is not None:
      fidelity = reference.fidelities.index(r.label_fidelity)
      per_atom.append((r.energy - reference.energy(r.atomic_numbers, fidelity)) / len(pos))
  if atoms == 0:
    raise ValueError("data statistics: no records")
  scale = np.sqrt(force_sq / force_n) if force_n else (np.std(per_atom) if per_atom else 1.0)
  return {"avg_num_neighbors": neighbors / atoms, "scale": float(max(scale, 1e-3)),
          "shift": float(np.median(per_atom)) if per_atom else 0.0}


def resolve_energy_config(config: EnergyModelConfig, records: Sequence[MoleculeRecord],
                          reference: EnergyReference) -> EnergyModelConfig:
  """`config` with the statistics it leaves unset (0) computed from `records`."""
  if config.resolved:
    return config
  stats = data_statistics(records, reference, config.cutoff)
  updates = {k: v for k, v in stats.items() if k == "shift" or getattr(config, k) == 0}
  if config.scale > 0:  # a given scale comes with its own shift
    updates.pop("shift")
  return dataclasses.replace(config, **updates)
