"""Summary counts of a store: accumulated while writing, so a summary never scans the data."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import ase.data
import numpy as np

from consist.data import store_format as fmt
from consist.data.record import MAX_Z, MoleculeRecord


class SummaryStats:
  """Summary counts accumulated while writing (so reading a summary never scans the data)."""

  def __init__(self):
    self.elements = np.zeros(MAX_Z + 1, np.int64)
    self.labels = collections.Counter({name: 0 for name in fmt.LABELS})
    self.tags = {kind: collections.Counter() for kind in fmt.FIDELITY_KINDS}
    self.records = self.atoms = 0

  def add(self, record: MoleculeRecord, z: np.ndarray) -> None:
    self.records += 1
    self.atoms += z.shape[0]
    self.elements += np.bincount(z, minlength=MAX_Z + 1)
    present = {"energy": record.energy is not None, "forces": record.forces is not None,
               "is_equilibrium": bool(record.is_equilibrium),
               "ref_positions": record.ref_positions is not None,
               "ref_energy": record.ref_energy is not None, "bonds": record.bonds is not None}
    self.labels.update({k: int(v) for k, v in present.items()})
    for kind in fmt.FIDELITY_KINDS:
      tag = getattr(record, f"{kind}_fidelity")
      if tag:
        self.tags[kind][tag] += 1

  def to_json(self, molecules: int) -> dict[str, Any]:
    return {
        "molecules": molecules,
        "conformations": self.records,
        "atoms": self.atoms,
        "elements": {ase.data.chemical_symbols[z]: int(n)
                     for z, n in enumerate(self.elements) if n},
        "labels": dict(self.labels),
        "fidelity_tags": {k: dict(sorted(c.items())) for k, c in self.tags.items()},
    }


def split_summary(manifest: dict[str, Any], path: Path | str) -> dict[str, Any]:
  """The JSON summary of one split, from the counts its writer recorded in the manifest."""
  stats = manifest["stats"]
  return {
      "path": str(path),
      "schema_version": manifest["schema_version"],
      **stats,
      "fidelities": sorted(stats["fidelity_tags"]["label"]),
      "units": manifest["units"],
      "shards": len(manifest["shards"]),
      "checksum": manifest["checksum"],
      "attrs": manifest["attrs"],
  }


def merge_stats(split_stats: list[dict[str, Any]], molecules: int) -> dict[str, Any]:
  """Sums per-split counts; `molecules` (unique over all splits) is counted by the caller."""
  out: dict[str, Any] = {"molecules": molecules, "conformations": 0, "atoms": 0, "elements": {},
                         "labels": {name: 0 for name in fmt.LABELS},
                         "fidelity_tags": {kind: {} for kind in fmt.FIDELITY_KINDS}}
  for stats in split_stats:
    out["conformations"] += stats["conformations"]
    out["atoms"] += stats["atoms"]
    for name, counts in (("elements", stats["elements"]), ("labels", stats["labels"])):
      for key, n in counts.items():
        out[name][key] = out[name].get(key, 0) + n
    for kind, counts in stats["fidelity_tags"].items():
      for tag, n in counts.items():
        out["fidelity_tags"][kind][tag] = out["fidelity_tags"][kind].get(tag, 0) + n
  out["fidelity_tags"] = {k: dict(sorted(c.items())) for k, c in out["fidelity_tags"].items()}
  return out


def dataset_summary(meta: dict[str, Any], manifests: dict[str, dict[str, Any]],
                    path: Path | str) -> dict[str, Any]:
  """The JSON summary of a dataset: totals over splits, then each split's summary."""
  per_split = {}
  for name, manifest in manifests.items():
    s = split_summary(manifest, Path(path) / name)
    per_split[name] = {k: v for k, v in s.items() if k not in ("schema_version", "units", "attrs")}
  return {
      "path": str(path),
      "schema_version": meta["schema_version"],
      **meta["stats"],
      "fidelities": sorted(meta["stats"]["fidelity_tags"]["label"]),
      "units": meta["units"],
      "split_sizes": {name: manifest["n_records"] for name, manifest in manifests.items()},
      "splits": per_split,
      "attrs": meta["attrs"],
  }
