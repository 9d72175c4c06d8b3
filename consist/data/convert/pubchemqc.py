"""PubChemQC B3LYP/6-31G*//PM6 (Nakata & Maeda 2023): per-molecule JSON records.

One JSON object per molecule, nested as on the PubChemQC site:

  {"pubchem": {"cid": 2244, "charge": 0, "multiplicity": 1, "Isomeric SMILES": ...,
               "B3LYP@PM6": {
                   "atoms": {"elements": {"number": [Z, ...]}, "coords": {"3d": [x, y, z, ...]}},
                   "bonds": {"connections": {"index": [i, j, ...]}, "order": [1, 2, ...]},
                   "properties": {"energy": {"total": E_hartree}, "charge": 0, "multiplicity": 1},
                   "openbabel": {"Canonical SMILES": ...}}}}

Coordinates are the PM6-optimised geometry (Å, flat list), bond pairs are 1-based, the total energy
is the B3LYP/6-31G* single point (hartree). Records: structure fidelity `pm6` (an equilibrium
structure at PM6), label fidelity `b3lyp/6-31g*`. Input: one `.json` file, a directory of them, or a
tar archive (`.tar.xz`) streamed member by member.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from consist import units
from consist.data.convert import sources
from consist.data.convert.report import BadRecord, ConversionReport
from consist.data.record import MoleculeRecord

STRUCTURE_FIDELITY = "pm6"
LABEL_FIDELITY = "b3lyp/6-31g*"
METHOD = "B3LYP@PM6"
# First present wins: the SMILES Open Babel perceived from this geometry, then PubChem's.
SMILES_KEYS = (
    (METHOD, "openbabel", "Canonical SMILES"),
    ("PM6", "openbabel", "Canonical SMILES"),
    (METHOD, "openbabel", "Isomeric SMILES"),
    ("Isomeric SMILES",),
)


def read(path: str | Path, report: ConversionReport) -> Iterator[MoleculeRecord]:
  """Yields one record per JSON file in `path` (a file, a directory or a tar archive of them)."""
  for where, content in sources.members(path, "*.json", report):
    record = report.build(where, lambda: parse(content))
    if record is not None:
      yield record


def _get(tree: dict[str, Any], *keys: str) -> Any:
  node = tree
  for k in keys:
    if not isinstance(node, dict) or k not in node:
      raise KeyError(k)
    node = node[k]
  return node


def _require(tree: dict[str, Any], *keys: str) -> Any:
  try:
    return _get(tree, *keys)
  except KeyError:
    raise BadRecord("missing_key", f"no key pubchem.{'.'.join(keys)}") from None


def _first(tree: dict[str, Any], *paths: tuple[str, ...]) -> Any:
  for keys in paths:
    try:
      return _get(tree, *keys)
    except KeyError:
      continue
  raise BadRecord("missing_key", "none of " + ", ".join("pubchem." + ".".join(k) for k in paths))


def parse(content: bytes) -> MoleculeRecord:
  """One PubChemQC B3LYP@PM6 JSON document -> record (unvalidated)."""
  try:
    text = content.decode("utf-8")
    doc = json.loads(text)
  except UnicodeDecodeError as e:
    raise BadRecord("parse_error", f"not UTF-8 text ({e})") from None
  except json.JSONDecodeError as e:
    ends_early = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated")
    raise BadRecord("truncated" if ends_early else "parse_error", f"invalid JSON ({e})") from None
  if not isinstance(doc, dict) or not isinstance(doc.get("pubchem"), dict):
    raise BadRecord("missing_key", "no top-level 'pubchem' object")
  pc = doc["pubchem"]
  z = np.asarray(_require(pc, METHOD, "atoms", "elements", "number"), dtype=np.int64)
  coords = np.asarray(_require(pc, METHOD, "atoms", "coords", "3d"), dtype=np.float64)
  if coords.ndim != 1 or coords.size != 3 * z.size:
    raise BadRecord("length_mismatch",
                    f"{z.size} atoms but {coords.size} coordinates (expected {3 * z.size})")
  pairs = np.asarray(_require(pc, METHOD, "bonds", "connections", "index"), dtype=np.int64)
  orders = np.asarray(_require(pc, METHOD, "bonds", "order"), dtype=np.float64)
  if pairs.ndim != 1 or pairs.size != 2 * orders.size:
    raise BadRecord("length_mismatch", f"{pairs.size} bond indices for {orders.size} bond orders")
  bonds = np.sort(pairs.reshape(-1, 2) - 1, axis=1)
  charge = _first(pc, (METHOD, "properties", "charge"), ("charge",))
  multiplicity = _first(pc, (METHOD, "properties", "multiplicity"), ("multiplicity",))
  try:
    smiles = str(_first(pc, *SMILES_KEYS))
  except BadRecord:
    smiles = ""
  cid = _require(pc, "cid")
  return MoleculeRecord(
      mol_id=f"pubchem:{int(cid)}",
      atomic_numbers=z.astype(np.int32),
      positions=coords.reshape(-1, 3),
      charge=int(charge),
      multiplicity=int(multiplicity),
      smiles=smiles,
      bonds=bonds.astype(np.int32),
      bond_orders=orders.astype(np.float32),
      energy=float(_require(pc, METHOD, "properties", "energy", "total")) * units.HARTREE_TO_EV,
      is_equilibrium=True,
      structure_fidelity=STRUCTURE_FIDELITY,
      label_fidelity=LABEL_FIDELITY,
  )
