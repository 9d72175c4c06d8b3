"""On-disk layout of the packed record store (schema shared by writer and reader).

A *dataset* is a directory holding `dataset.json` and one *split* sub-directory per split. A split
holds `manifest.json`, a split-level `n_atoms.bin` (int32 [R], the index budgets and bucketing read
without decoding records) and shards `shard-00000/`, `shard-00001/`, ... Each shard is a set of raw
little-endian column files `<column>.bin`; dtype, shape and sha256 of every file are in the
manifest, which is written last. Columns (R = records, A = atoms, B = bonds, F = atoms of records
that carry the label, all counted within the shard):

  per atom    atomic_numbers uint8 [A], positions float32 [A, 3] (Å)
  per record  n_atoms int32, atom_offset int64, charge int16, multiplicity int16,
              is_equilibrium bool, energy float64 (eV) + has_energy bool,
              ref_energy float64 (eV) + has_ref_energy bool,
              structure_fidelity / label_fidelity / ref_fidelity int16 (index into the manifest's
              `fidelity_tags`, -1 = no tag), n_bonds int32 (-1 = no bond graph), bond_offset int64,
              forces_row / ref_positions_row int64 (first row in `forces` / `ref_positions`,
              -1 = absent), mol_hash uint64 (blake2b-64 of the mol_id, for counting molecules)
  per bond    bonds int32 [B, 2] (atom indices local to the molecule), bond_orders float32 [B]
  per label   forces float32 [F, 3] (eV/Å), ref_positions float32 [F, 3] (Å): only records that
              have the label use rows, so data without forces stores no force bytes
  strings     mol_id_offset / smiles_offset int64 [R + 1] into mol_id_bytes / smiles_bytes
              uint8 (utf-8)

Positions, forces and reference positions are stored float32 and energies float64: a record reads
back bit-exactly in those dtypes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
STORE_FORMAT = "consist-store"
DATASET_FORMAT = "consist-dataset"
MANIFEST = "manifest.json"
DATASET_JSON = "dataset.json"
INDEX_FILE = "n_atoms.bin"
INDEX_DTYPE = np.dtype("<i4")
PARTIAL_TAG = ".partial-"

UNITS = {
    "positions": "angstrom",
    "ref_positions": "angstrom",
    "energy": "eV",
    "ref_energy": "eV",
    "forces": "eV/angstrom",
    "charge": "e",
}

# column name -> (little-endian dtype, trailing shape)
ATOM_COLUMNS = {"atomic_numbers": ("|u1", ()), "positions": ("<f4", (3,))}
RECORD_COLUMNS = {
    "n_atoms": ("<i4", ()),
    "atom_offset": ("<i8", ()),
    "charge": ("<i2", ()),
    "multiplicity": ("<i2", ()),
    "is_equilibrium": ("|b1", ()),
    "energy": ("<f8", ()),
    "has_energy": ("|b1", ()),
    "ref_energy": ("<f8", ()),
    "has_ref_energy": ("|b1", ()),
    "structure_fidelity": ("<i2", ()),
    "label_fidelity": ("<i2", ()),
    "ref_fidelity": ("<i2", ()),
    "n_bonds": ("<i4", ()),
    "bond_offset": ("<i8", ()),
    "forces_row": ("<i8", ()),
    "ref_positions_row": ("<i8", ()),
    "mol_hash": ("<u8", ()),
}
BOND_COLUMNS = {"bonds": ("<i4", (2,)), "bond_orders": ("<f4", ())}
LABEL_COLUMNS = {"forces": ("<f4", (3,)), "ref_positions": ("<f4", (3,))}
STRING_FIELDS = ("mol_id", "smiles")
STRING_COLUMNS = {}
for _field in STRING_FIELDS:
  STRING_COLUMNS[f"{_field}_offset"] = ("<i8", ())
  STRING_COLUMNS[f"{_field}_bytes"] = ("|u1", ())
COLUMNS = {**ATOM_COLUMNS, **RECORD_COLUMNS, **BOND_COLUMNS, **LABEL_COLUMNS, **STRING_COLUMNS}

LABELS = ("energy", "forces", "is_equilibrium", "ref_positions", "ref_energy", "bonds")
FIDELITY_KINDS = ("structure", "label", "ref")
MAX_FIDELITY_TAGS = np.iinfo(np.int16).max


class StoreError(ValueError):
  """A store or dataset on disk is missing, incomplete, corrupt, or would be overwritten."""


def mol_hash(mol_id: str) -> int:
  """64-bit stable hash of a molecule id (collisions ~1e-4 at 10^8 molecules: counting only)."""
  return int.from_bytes(hashlib.blake2b(mol_id.encode("utf-8"), digest_size=8).digest(), "little")


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def content_checksum(files: dict[str, dict[str, Any]]) -> str:
  """One sha256 over the per-file checksums (sorted by relative path)."""
  h = hashlib.sha256()
  for rel in sorted(files):
    h.update(f"{rel}\0{files[rel]['sha256']}\n".encode())
  return h.hexdigest()


def check_column_file(path: Path, dtype: str, shape: list[int]) -> int:
  """The file's size in bytes if it is what the manifest says; StoreError naming it otherwise."""
  expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
  try:
    size = path.stat().st_size
  except FileNotFoundError:
    raise StoreError(f"{path}: column file is missing (the store is damaged)") from None
  if size != expected:
    raise StoreError(
        f"{path}: column file has {size} bytes, the manifest says {expected} "
        f"({dtype} {list(shape)}): truncated or corrupt (the store is damaged)")
  return size


def map_column(path: Path, dtype: str, shape: list[int]) -> np.ndarray:
  """Memory-maps a raw column file read-only as a plain ndarray; checks its size first."""
  dt = np.dtype(dtype)
  expected = check_column_file(path, dtype, shape)
  if expected == 0:
    return np.empty(shape, dt)
  return np.asarray(np.memmap(path, dtype=dt, mode="r", shape=tuple(shape)))


def write_json_durably(path: Path, obj: dict[str, Any]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False)
    f.flush()
    os.fsync(f.fileno())


def read_json(path: Path, what: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise StoreError(f"{path}: {what} is missing (not a complete consist store)") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StoreError(f"{path}: {what} is not valid JSON ({e})") from None


def fsync_dir(path: Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def count_unique(hash_arrays: list[np.ndarray], bucket_size: int = 1 << 24) -> int:
  """Number of distinct values over several uint64 arrays, sorting at most ~bucket_size at once."""
  total = sum(a.shape[0] for a in hash_arrays)
  n_buckets = max(1, -(-total // bucket_size))
  if n_buckets == 1:
    arrays = [np.asarray(a) for a in hash_arrays] or [np.empty(0, np.uint64)]
    return int(np.unique(np.concatenate(arrays)).size)
  count = 0
  for b in range(n_buckets):
    parts = [a[a % np.uint64(n_buckets) == b] for a in hash_arrays]
    count += int(np.unique(np.concatenate(parts)).size)
  return count

