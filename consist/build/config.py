"""ConfigDict (configs/dataset_*.py) -> typed BuildSpec, and the smoke-subset writer."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ml_collections

from consist.build.builder import BuildSpec
from consist.build.molecule import BuildSettings


def settings_config(**overrides: Any) -> ml_collections.ConfigDict:
  """BuildSettings defaults as a ConfigDict (tuples stay tuples)."""
  base = BuildSettings().to_json()
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def spec_from_config(config: ml_collections.ConfigDict) -> BuildSpec:
  s = config.settings.to_dict()
  fields = {f.name for f in dataclasses.fields(BuildSettings)}
  unknown = set(s) - fields
  if unknown:
    raise ValueError(f"config.settings: unknown field(s) {sorted(unknown)}; known: {sorted(fields)}")
  s["accurate_options"] = tuple(sorted(dict(s.get("accurate_options", {})).items()))
  for name in ("offeq_splits", "offeq_temperatures", "ref_splits"):
    if name in s:
      s[name] = tuple(s[name])
  return BuildSpec(source=config.source, out=config.out, workdir=config.workdir,
                   n_molecules=config.n_molecules,
                   max_heavy_atoms=config.get("max_heavy_atoms", 0),
                   split_method=config.get("split_method", "scaffold"),
                   split_fractions=tuple((str(k), float(v)) for k, v in config.split_fractions),
                   settings=BuildSettings(**s), chunk_size=config.chunk_size,
                   workers=config.workers)


def write_subset(source: Path, out: Path, counts: dict[str, int], *, overwrite: bool) -> dict[str, int]:
  """Copies the first `counts[split]` molecules (all their records) of each split of a dataset."""
  from consist.data.store import DatasetWriter, open_dataset  # pylint: disable=g-import-not-at-top
  src = open_dataset(source)
  attrs = dict(src.attrs)
  attrs["subset_of"] = {"dataset": str(source), "molecules_per_split": dict(counts)}
  attrs["failures"] = {"counts": attrs.get("failures", {}).get("counts", {}),
                       "note": f"failures of the full build; molecule list in {source}/dataset.json"}
  written = {}
  with DatasetWriter(out, overwrite=overwrite, attrs=attrs) as ds:
    for name, n_mol in counts.items():
      store, writer, kept = src[name], ds.split(name), []
      for i, mol_id in enumerate(store.mol_ids()):
        if mol_id not in kept:
          if len(kept) == n_mol:
            continue
          kept.append(mol_id)
        writer.append(store[i], where=f"{source}/{name}[{i}]")
      written[name] = len(kept)
  return written
