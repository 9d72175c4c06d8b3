"""Deterministic molecule splits: Bemis–Murcko scaffold (default) or per-molecule hash."""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np
from rdkit import Chem
from rdkit.Chem.Scaffolds import MurckoScaffold


def scaffold(smiles: str) -> str:
  """Canonical Bemis–Murcko scaffold SMILES ("" for acyclic or unparsable molecules)."""
  mol = Chem.MolFromSmiles(smiles)
  if mol is None:
    return ""
  return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)


def scaffold_split(smiles: Sequence[str], fractions: dict[str, float], seed: int) -> list[str]:
  """Split name per molecule; molecules sharing a scaffold always share a split.

  Scaffold groups larger than half of the smallest non-first split go to the first split (e.g.
  train: the acyclic and benzene groups); the other groups are ordered by a seeded hash of the
  scaffold and fill the splits in the order of `fractions` (chemprop's balanced scaffold split).
  """
  names = list(fractions)
  total = sum(fractions.values())
  targets = {k: fractions[k] / total * len(smiles) for k in names}
  groups: dict[str, list[int]] = collections.defaultdict(list)
  for i, smi in enumerate(smiles):
    groups[scaffold(smi)].append(i)
  big_limit = min((targets[k] for k in names[1:]), default=len(smiles)) / 2
  big = sorted((s for s in groups if len(groups[s]) > big_limit), key=lambda s: (-len(groups[s]), s))
  rest = sorted((s for s in groups if len(groups[s]) <= big_limit),
                key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
  out = [""] * len(smiles)
  filled = dict.fromkeys(names, 0)
  k = 0
  for s in big + rest:
    if s in big:
      name = names[0]
    else:
      while k < len(names) - 1 and filled[names[k]] + len(groups[s]) > targets[names[k]]:
        k += 1
      name = names[k]
    for i in groups[s]:
      out[i] = name
    filled[name] += len(groups[s])
  return out


def hash_split(smiles: Sequence[str], fractions: dict[str, float], seed: int) -> list[str]:
  """Split name per molecule from a seeded hash of its SMILES (for sets of mostly acyclic molecules,
  where one scaffold group, "", would take everything)."""
  names = list(fractions)
  edges = np.cumsum([fractions[k] for k in names]) / sum(fractions.values())
  out = []
  for smi in smiles:
    u = int.from_bytes(hashlib.sha256(f"{seed}:split:{smi}".encode()).digest()[:8], "little") / 2.0**64
    out.append(names[min(int(np.searchsorted(edges, u, side="right")), len(names) - 1)])
  return out


SPLIT_METHODS = {"scaffold": (scaffold_split, "Bemis-Murcko scaffold (balanced, seeded)"),
                 "hash": (hash_split, "seeded hash of the SMILES")}
