"""train / val / test splits of a conversion, by molecule or by Bemis-Murcko scaffold.

Records are grouped (all conformations of one `mol_id`, or all molecules of one scaffold) and whole
groups are assigned, so no molecule (or scaffold) is in two splits. The assignment is a function of
the group keys, their sizes and `seed` only (not of the input order): groups larger than half the
data (e.g. the acyclic molecules' empty scaffold) go to train; the others, in an order hashed from
(seed, key), give train its first group, then fill val then test until each holds its fraction of the records (overshooting by at most
one group); the rest is train.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

from consist.data.convert.bonds import quiet_rdkit
from consist.data.convert.report import ConversionError
from consist.data.record import MoleculeRecord

SPLIT_NAMES = ("train", "val", "test")
SPLIT_BY = ("molecule", "scaffold")
ACYCLIC = "(acyclic)"


def parse_fractions(text: str | Sequence[float]) -> tuple[float, ...]:
  """'0.9,0.05,0.05' -> (0.9, 0.05, 0.05): 2 or 3 fractions (train, val[, test]), each >= 0, train > 0,
  summing to 1. ValueError with the fix otherwise."""
  try:
    values = tuple(float(v) for v in (text.split(",") if isinstance(text, str) else text))
  except ValueError:
    raise ValueError(f"{text!r}: expected 2 or 3 comma-separated numbers (train,val[,test]), "
                     "e.g. 0.9,0.05,0.05") from None
  if len(values) not in (2, 3) or any(not 0 <= v <= 1 for v in values) or values[0] <= 0:
    raise ValueError(f"{text!r}: expected 2 or 3 fractions in [0, 1] (train,val[,test]) with train > 0, "
                     "e.g. 0.9,0.05,0.05")
  if abs(sum(values) - 1) > 1e-6:
    raise ValueError(f"{text!r}: the fractions sum to {sum(values):g}, not 1")
  return values


def group_key(record: MoleculeRecord, split_by: str, where: str) -> str:
  """The key whose records stay together: the mol_id, or the Bemis-Murcko scaffold of the SMILES."""
  if split_by == "molecule":
    return record.mol_id
  if split_by != "scaffold":
    raise ValueError(f"split_by: expected one of {SPLIT_BY}, got {split_by!r}")
  if not record.smiles:
    raise ConversionError(f"{where}: has no SMILES, which a scaffold split needs; "
                          "split by molecule instead (--split_by=molecule)")
  from rdkit import Chem  # pylint: disable=g-import-not-at-top
  from rdkit.Chem.Scaffolds import MurckoScaffold  # pylint: disable=g-import-not-at-top
  with quiet_rdkit():
    mol = Chem.MolFromSmiles(record.smiles)
  if mol is None:
    raise ConversionError(f"{where}: RDKit cannot parse its SMILES {record.smiles!r} for a scaffold "
                          "split; split by molecule instead (--split_by=molecule)")
  return MurckoScaffold.MurckoScaffoldSmiles(mol=mol) or ACYCLIC


def _order(seed: int, key: str) -> bytes:
  return hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()


def assign(group_sizes: dict[str, int], fractions: Sequence[float], seed: int = 0) -> dict[str, str]:
  """{group key: split name} (see the module docstring)."""
  names = SPLIT_NAMES[:len(fractions)]
  total = sum(group_sizes.values())
  targets = {name: f * total for name, f in zip(names, fractions)}
  counts = dict.fromkeys(names, 0)
  out = {}
  for key in sorted(group_sizes, key=lambda k: (group_sizes[k] <= total / 2, _order(seed, k))):
    size = group_sizes[key]
    name = "train"
    if size <= total / 2 and counts["train"]:  # train gets a group first
      name = next((n for n in names[1:] if counts[n] < targets[n]), "train")
    out[key] = name
    counts[name] += size
  return out


def split_sizes(groups: Iterable[tuple[str, int]], assignment: dict[str, str]) -> dict[str, int]:
  sizes: dict[str, int] = {}
  for key, size in groups:
    sizes[assignment[key]] = sizes.get(assignment[key], 0) + size
  return sizes
