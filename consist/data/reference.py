"""Linear per-element, per-fidelity reference energies (STYLE lesson 3: subtract in float64).

Total energies are large (-10^3..-10^5 eV) and differ between levels of theory by element-dependent
amounts (an xTB and a DFT total energy of the same molecule differ by ~10^3 eV, mostly per atom).
So each fidelity f gets its own per-element energies, fitted by least squares in float64:

    E(molecule at fidelity f) ≈ Σ_Z n_Z e_{f,Z}

and the batch carries E - reference as float32 (`consist.data.batching`). A per-element model per
fidelity subsumes a per-fidelity constant offset for the molecules' atom counts and removes the
element-dependent part a constant cannot. A truncated-SVD least squares (the zero-strength limit of a
ridge) makes the fit well-defined for elements seen rarely or only in fixed combinations while
leaving well-determined energies exact.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Sequence

import numpy as np

from consist.data.record import MAX_Z, MoleculeRecord

RCOND = 1e-10


@dataclasses.dataclass(frozen=True)
class EnergyReference:
  """Per-fidelity per-element reference energies.

  Attributes:
    fidelities: the fidelity vocabulary that `GraphBatch.fidelity` indexes.
    element_energy: float64 [len(fidelities), MAX_Z + 1], eV per atom; NaN where (fidelity, element)
      was not seen in the fit.
    rmse: float64 [len(fidelities)], eV: fit residual RMS per fidelity (NaN if no energies).
    n_fit: int [len(fidelities)]: energies used per fidelity.
  """

  fidelities: tuple[str, ...]
  element_energy: np.ndarray
  rmse: np.ndarray
  n_fit: np.ndarray

  @classmethod
  def fit(cls, records: Iterable[MoleculeRecord], fidelities: Sequence[str], *,
          rcond: float = RCOND) -> "EnergyReference":
    """Least-squares fit on every record with an energy (a `Store` or any iterable of records).

    Raises:
      ValueError: a record's label fidelity is not in `fidelities`.
    """
    fidelities = tuple(fidelities)
    index = {f: i for i, f in enumerate(fidelities)}
    counts: list[list[np.ndarray]] = [[] for _ in fidelities]
    energies: list[list[float]] = [[] for _ in fidelities]
    source = records
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
      records = (source[i] for i in range(len(source)))
    for i, record in enumerate(records):
      if record.energy is None:
        continue
      if record.label_fidelity not in index:
        raise ValueError(f"record {i} (mol_id={record.mol_id!r}): label fidelity "
                         f"{record.label_fidelity!r} not in the vocabulary {list(fidelities)}")
      f = index[record.label_fidelity]
      counts[f].append(np.bincount(np.asarray(record.atomic_numbers), minlength=MAX_Z + 1))
      energies[f].append(float(record.energy))
    element_energy = np.full((len(fidelities), MAX_Z + 1), np.nan)
    rmse = np.full(len(fidelities), np.nan)
    for f in range(len(fidelities)):
      if not energies[f]:
        continue
      a = np.stack(counts[f]).astype(np.float64)  # [m, MAX_Z + 1]
      y = np.asarray(energies[f], dtype=np.float64)
      seen = np.flatnonzero(a.sum(axis=0) > 0)
      a = a[:, seen]
      # Columns scaled to unit norm; singular values below RCOND * max are truncated (a ridge acting
      # only on near-null directions: elements seen rarely or only in fixed combinations get the
      # minimum-norm split), well-determined energies are exact.
      scale = np.sqrt((a**2).sum(axis=0))
      x, *_ = np.linalg.lstsq(a / scale, y, rcond=rcond)
      x = x / scale
      element_energy[f, seen] = x
      rmse[f] = float(np.sqrt(np.mean((a @ x - y) ** 2)))
    n_fit = np.asarray([len(e) for e in energies], dtype=np.int64)
    return cls(fidelities, element_energy, rmse, n_fit)

  def energy(self, atomic_numbers: np.ndarray, fidelity_index: int) -> float:
    """Reference energy (eV, float64) of a molecule at fidelity `fidelities[fidelity_index]`.

    Raises:
      KeyError: an element has no fitted energy at that fidelity.
    """
    e = self.element_energy[fidelity_index][np.asarray(atomic_numbers)]
    if np.isnan(e).any():
      missing = sorted({int(z) for z in np.asarray(atomic_numbers)[np.isnan(e)]})
      raise KeyError(f"no reference energy for element(s) Z={missing} at fidelity "
                     f"{self.fidelities[fidelity_index]!r}: not present in the records fitted")
    return float(e.sum(dtype=np.float64))

  def to_json(self) -> dict:
    """{"fidelities": [...], "element_energy_ev": {fidelity: {Z: eV}}, "rmse_ev": ..., "n_fit": ...}."""
    table = {}
    for f, name in enumerate(self.fidelities):
      seen = np.flatnonzero(~np.isnan(self.element_energy[f]))
      table[name] = {str(int(z)): float(self.element_energy[f, z]) for z in seen}
    return {
        "fidelities": list(self.fidelities),
        "element_energy_ev": table,
        "rmse_ev": {n: (None if np.isnan(r) else float(r)) for n, r in zip(self.fidelities, self.rmse)},
        "n_fit": {n: int(c) for n, c in zip(self.fidelities, self.n_fit)},
    }

  @classmethod
  def from_json(cls, d: dict) -> "EnergyReference":
    fidelities = tuple(d["fidelities"])
    element_energy = np.full((len(fidelities), MAX_Z + 1), np.nan)
    for f, name in enumerate(fidelities):
      for z, e in d["element_energy_ev"].get(name, {}).items():
        element_energy[f, int(z)] = float(e)
    rmse = np.asarray([np.nan if d["rmse_ev"].get(n) is None else d["rmse_ev"][n] for n in fidelities])
    n_fit = np.asarray([int(d["n_fit"].get(n, 0)) for n in fidelities], dtype=np.int64)
    return cls(fidelities, element_energy, rmse, n_fit)

  def save(self, path) -> None:
    with open(path, "w") as f:
      json.dump(self.to_json(), f, indent=1)

  @classmethod
  def load(cls, path) -> "EnergyReference":
    with open(path) as f:
      return cls.from_json(json.load(f))
