"""The packed on-disk record store: random access by index, memory-mapped, sharded.

  with DatasetWriter("data/mine") as ds:          # streaming, bounded memory, atomic finalise
    for rec in records:
      ds.split("train").append(rec, where=f"input.xyz: frame {i}")
  dataset = open_dataset("data/mine")             # Dataset; dataset["train"] is a Store
  rec = dataset["train"][17]                      # MoleculeRecord
  grain.MapDataset.source(dataset["train"])       # a Store is a grain RandomAccessDataSource

Layout, dtypes and units: `consist.data.store_format`. Records read back exactly in the stored
dtypes: positions, forces and ref_positions float32 (Å, eV/Å), energies float64 (eV), bonds int32,
bond orders float32; atomic numbers are stored uint8 and returned as int32.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import numpy as np

from consist.data import store_format as fmt
from consist.data import store_summary
from consist.data.record import MAX_Z, MoleculeRecord
from consist.data.store_format import StoreError
from consist.data.store_writer import DatasetWriter, StoreWriter

# Beyond these a stored value is damage, not chemistry (the writer stores only validated records).
MAX_ABS_COORDINATE = 1e4  # Å
MAX_ABS_FORCE = 1e5  # eV/Å
MAX_ABS_ENERGY = 1e9  # eV

__all__ = ["Dataset", "DatasetWriter", "Store", "StoreError", "StoreWriter", "open_dataset",
           "open_store"]


def _check_header(meta: dict[str, Any], path: Path, expected_format: str) -> None:
  if meta.get("format") != expected_format:
    raise StoreError(f"{path}: not a {expected_format} file (format={meta.get('format')!r})")
  if meta.get("schema_version") != fmt.SCHEMA_VERSION:
    raise StoreError(f"{path}: schema version {meta.get('schema_version')!r}, this code reads "
                     f"version {fmt.SCHEMA_VERSION}")


def _missing_message(path: Path, marker: str, noun: str) -> str:
  partials = sorted(p.name for p in path.parent.glob(f"{path.name}{fmt.PARTIAL_TAG}*"))
  hint = (f"; found unfinished writer output {partials} (a writer was killed or failed: rerun it)"
          if partials else "")
  if not path.exists():
    return f"{path}: no such {noun}{hint}"
  return f"{path}: not a complete consist {noun} (no {marker}){hint}"


class Store:
  """Read side of one split. A grain RandomAccessDataSource: `len(store)`, `store[i]`.

  Column files are memory-mapped lazily per shard, so opening is O(number of shards) and reading
  touches only the pages of the records read. Picklable: unpickled copies remap on first use
  (grain worker processes).
  """

  def __init__(self, path, *, verify: bool = False):
    self.path = Path(path)
    if not (self.path / fmt.MANIFEST).exists():
      raise StoreError(_missing_message(self.path, fmt.MANIFEST, "store"))
    if fmt.PARTIAL_TAG in self.path.resolve().parent.name:
      raise StoreError(f"{self.path}: lies inside unfinished dataset writer output")
    self._setup(fmt.read_json(self.path / fmt.MANIFEST, "manifest"))
    if verify:
      self.verify()

  def _setup(self, manifest: dict[str, Any]) -> None:
    _check_header(manifest, self.path / fmt.MANIFEST, fmt.STORE_FORMAT)
    missing = {"n_records", "n_atoms", "fidelity_tags", "stats", "index", "shards", "checksum",
               "units", "attrs"} - set(manifest)
    if missing:
      raise StoreError(f"{self.path / fmt.MANIFEST}: lacks entries {sorted(missing)}")
    self._manifest = manifest
    self._tags = manifest["fidelity_tags"]
    self._starts = np.cumsum([0] + [s["n_records"] for s in manifest["shards"]], dtype=np.int64)
    if self._starts[-1] != manifest["n_records"]:
      raise StoreError(f"{self.path / fmt.MANIFEST}: shard sizes do not add up to n_records")
    self._shards: list[dict[str, np.ndarray] | None] = [None] * len(manifest["shards"])
    self._n_atoms: np.ndarray | None = None
    self._check_file_sizes()

  def _check_file_sizes(self) -> None:
    """Every column file exists with the size the manifest gives (one stat per file; `verify`
    compares contents)."""
    for s, shard in enumerate(self._manifest["shards"]):
      missing = sorted(set(fmt.COLUMNS) - set(shard["files"]))
      if missing:
        raise StoreError(f"{self.path / fmt.MANIFEST}: shard {s} lacks columns {missing}")
      for f in shard["files"].values():
        fmt.check_column_file(self.path / f["path"], f["dtype"], f["shape"])
    index = self._manifest["index"]
    fmt.check_column_file(self.path / index["path"], index["dtype"], index["shape"])

  def __getstate__(self) -> dict[str, Any]:
    return {"path": str(self.path), "manifest": self._manifest}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.path = Path(state["path"])
    self._setup(state["manifest"])

  def __repr__(self) -> str:
    return f"Store({str(self.path)!r}, records={len(self)}, atoms={self._manifest['n_atoms']})"

  def __len__(self) -> int:
    return int(self._manifest["n_records"])

  @property
  def attrs(self) -> dict[str, Any]:
    return self._manifest["attrs"]

  @property
  def manifest(self) -> dict[str, Any]:
    """The parsed manifest.json (layout in consist.data.store_format)."""
    return self._manifest

  @property
  def checksum(self) -> str:
    return self._manifest["checksum"]

  @property
  def fidelities(self) -> list[str]:
    """Sorted label-fidelity tags present in this split."""
    return sorted(self._manifest["stats"]["fidelity_tags"]["label"])

  @property
  def n_atoms(self) -> np.ndarray:
    """int32 [len] atoms per record, memory-mapped (no record is decoded)."""
    if self._n_atoms is None:
      index = self._manifest["index"]
      self._n_atoms = fmt.map_column(self.path / index["path"], index["dtype"], index["shape"])
      if self._n_atoms.shape != (len(self),):
        raise StoreError(f"{self.path / index['path']}: index has shape {self._n_atoms.shape}, "
                         f"expected ({len(self)},)")
    return self._n_atoms

  def _columns(self, s: int) -> dict[str, np.ndarray]:
    if self._shards[s] is None:
      files = self._manifest["shards"][s]["files"]
      missing = sorted(set(fmt.COLUMNS) - set(files))
      if missing:
        raise StoreError(f"{self.path / fmt.MANIFEST}: shard {s} lacks columns {missing}")
      self._shards[s] = {name: fmt.map_column(self.path / f["path"], f["dtype"], f["shape"])
                         for name, f in files.items()}
    return self._shards[s]

  def _locate(self, i) -> tuple[int, int]:
    try:
      i = operator.index(i)
    except TypeError:
      raise TypeError(
          f"{self.path}: store index must be an integer, got {type(i).__name__}") from None
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"{self.path}: record {i} out of range for {n} records")
    i %= n
    s = int(np.searchsorted(self._starts, i, side="right")) - 1
    return s, i - int(self._starts[s])

  def _tag(self, index) -> str:
    return "" if index < 0 else self._tags[index]

  def __getitem__(self, i) -> MoleculeRecord:
    s, j = self._locate(i)
    c = self._columns(s)
    n, a0 = int(c["n_atoms"][j]), int(c["atom_offset"][j])

    def label(name: str) -> np.ndarray | None:
      row = int(c[f"{name}_row"][j])
      return None if row < 0 else c[name][row:row + n].copy()

    def text(name: str) -> str:
      offsets = c[f"{name}_offset"]
      return c[f"{name}_bytes"][offsets[j]:offsets[j + 1]].tobytes().decode("utf-8")

    n_bonds, b0 = int(c["n_bonds"][j]), int(c["bond_offset"][j])
    try:
      record = self._record(c, j, n, a0, n_bonds, b0, label, text)
    except (UnicodeDecodeError, IndexError, ValueError) as e:
      raise self._damaged(i, None, f"cannot be decoded ({type(e).__name__}: {e})") from None
    self._check_values(i, record)
    return record

  def _damaged(self, i, mol_id, what: str) -> StoreError:
    who = "" if mol_id is None else f" (mol_id={mol_id!r})"
    return StoreError(f"{self.path}: record {i}{who}: {what}: the store is damaged (a file changed after "
                      f"it was written); `python -m launch.inspect {self.path.parent} --verify` names the file")

  def _check_values(self, i, r: MoleculeRecord) -> None:
    """What the writer never stores (it validates every record): seen on read, the data is damaged."""
    n = r.n_atoms
    z = r.atomic_numbers
    if n < 1 or r.positions.shape != (n, 3):
      raise self._damaged(i, r.mol_id, f"{n} atoms with positions of shape {r.positions.shape}")
    if ((z < 1) | (z > MAX_Z)).any():
      raise self._damaged(i, r.mol_id, f"atomic number {int(z[(z < 1) | (z > MAX_Z)][0])}")
    for name, limit, unit in (("positions", MAX_ABS_COORDINATE, "Å"), ("ref_positions", MAX_ABS_COORDINATE, "Å"),
                              ("forces", MAX_ABS_FORCE, "eV/Å")):
      arr = getattr(r, name)
      if arr is None:
        continue
      if arr.shape != (n, 3):
        raise self._damaged(i, r.mol_id, f"{name} of shape {arr.shape} for {n} atoms")
      if not np.isfinite(arr).all():
        raise self._damaged(i, r.mol_id, f"{name} hold NaN/inf")
      if np.abs(arr).max() > limit:
        raise self._damaged(i, r.mol_id, f"{name} hold {np.abs(arr).max():.3g} {unit} (a molecule's "
                                         f"stay within ±{limit:g} {unit})")
    for name in ("energy", "ref_energy"):
      v = getattr(r, name)
      if v is not None and not (np.isfinite(v) and abs(v) <= MAX_ABS_ENERGY):
        raise self._damaged(i, r.mol_id, f"{name} = {v:.3g} eV (beyond ±{MAX_ABS_ENERGY:g} eV)")
    if r.multiplicity < 1:
      raise self._damaged(i, r.mol_id, f"multiplicity {r.multiplicity}")
    if r.bonds is not None and r.bonds.size and (r.bonds.min() < 0 or r.bonds.max() >= n):
      raise self._damaged(i, r.mol_id, f"a bond index outside its {n} atoms")

  def _record(self, c, j, n, a0, n_bonds, b0, label, text) -> MoleculeRecord:
    return MoleculeRecord(
        mol_id=text("mol_id"),
        atomic_numbers=c["atomic_numbers"][a0:a0 + n].astype(np.int32),
        positions=c["positions"][a0:a0 + n].copy(),
        charge=int(c["charge"][j]),
        multiplicity=int(c["multiplicity"][j]),
        smiles=text("smiles"),
        bonds=None if n_bonds < 0 else c["bonds"][b0:b0 + n_bonds].copy(),
        bond_orders=None if n_bonds < 0 else c["bond_orders"][b0:b0 + n_bonds].copy(),
        energy=float(c["energy"][j]) if c["has_energy"][j] else None,
        forces=label("forces"),
        is_equilibrium=bool(c["is_equilibrium"][j]),
        structure_fidelity=self._tag(int(c["structure_fidelity"][j])),
        label_fidelity=self._tag(int(c["label_fidelity"][j])),
        ref_positions=label("ref_positions"),
        ref_fidelity=self._tag(int(c["ref_fidelity"][j])),
        ref_energy=float(c["ref_energy"][j]) if c["has_ref_energy"][j] else None,
    )

  def mol_ids(self) -> np.ndarray:
    """str [len] molecule id of every record (decodes only the id strings)."""
    out = []
    for s in range(len(self._shards)):
      c = self._columns(s)
      blob, offsets = c["mol_id_bytes"].tobytes(), c["mol_id_offset"]
      out.extend(blob[offsets[j]:offsets[j + 1]].decode("utf-8") for j in range(len(offsets) - 1))
    return np.asarray(out, dtype=str) if out else np.empty(0, dtype=str)

  def summary(self) -> dict[str, Any]:
    """Molecules, conformations, atoms, elements, label counts, fidelity tags, units."""
    return store_summary.split_summary(self._manifest, self.path)

  def coverage(self) -> dict[str, list[int]]:
    """{"charges": sorted distinct total charges, "multiplicities": sorted distinct spin
    multiplicities} of the records (reads the two int16 columns, decodes no record)."""
    charges, multiplicities = set(), set()
    for s in range(len(self._shards)):
      c = self._columns(s)
      charges.update(np.unique(c["charge"]).tolist())
      multiplicities.update(np.unique(c["multiplicity"]).tolist())
    return {"charges": sorted(int(v) for v in charges),
            "multiplicities": sorted(int(v) for v in multiplicities)}

  def verify(self) -> None:
    """Recomputes every column file's sha256; raises StoreError naming the first mismatch."""
    files = {s_f["path"]: s_f for s in self._manifest["shards"] for s_f in s["files"].values()}
    files[self._manifest["index"]["path"]] = self._manifest["index"]
    if fmt.content_checksum(files) != self.checksum:
      raise StoreError(f"{self.path / fmt.MANIFEST}: content checksum does not match its file list")
    for rel, meta in sorted(files.items()):
      path = self.path / rel
      fmt.map_column(path, meta["dtype"], meta["shape"])  # existence and size
      if fmt.file_sha256(path) != meta["sha256"]:
        raise StoreError(f"{path}: sha256 mismatch with the manifest (file corrupted or modified)")


class Dataset:
  """A directory of splits with `dataset.json`; `dataset[split]` is a Store."""

  def __init__(self, path, *, verify: bool = False):
    self.path = Path(path)
    if not (self.path / fmt.DATASET_JSON).exists():
      raise StoreError(_missing_message(self.path, fmt.DATASET_JSON, "dataset"))
    self._meta = fmt.read_json(self.path / fmt.DATASET_JSON, "dataset.json")
    _check_header(self._meta, self.path / fmt.DATASET_JSON, fmt.DATASET_FORMAT)
    self.splits: dict[str, Store] = {}
    for name, info in self._meta["splits"].items():
      store = Store(self.path / name, verify=verify)
      if store.checksum != info["checksum"] or len(store) != info["n_records"]:
        raise StoreError(f"{self.path / name / fmt.MANIFEST}: does not match the split recorded "
                         f"in {self.path / fmt.DATASET_JSON} (replaced or modified)")
      self.splits[name] = store

  def __repr__(self) -> str:
    return f"Dataset({str(self.path)!r}, splits={ {k: len(v) for k, v in self.splits.items()} })"

  def __getitem__(self, split: str) -> Store:
    if split not in self.splits:
      raise KeyError(f"{self.path}: no split {split!r}; splits are {list(self.splits)}")
    return self.splits[split]

  @property
  def attrs(self) -> dict[str, Any]:
    return self._meta["attrs"]

  @property
  def fidelities(self) -> list[str]:
    """Sorted union of the splits' label-fidelity tags (what GraphBatch.fidelity indexes)."""
    return sorted({tag for store in self.splits.values() for tag in store.fidelities})

  def summary(self) -> dict[str, Any]:
    manifests = {name: store.manifest for name, store in self.splits.items()}
    return store_summary.dataset_summary(self._meta, manifests, self.path)

  def verify(self) -> None:
    for store in self.splits.values():
      store.verify()


def open_dataset(path, *, verify: bool = False) -> Dataset:
  """Opens a complete dataset; StoreError naming the path if missing, incomplete or corrupt."""
  return Dataset(path, verify=verify)


def open_store(path, *, verify: bool = False) -> Store:
  """Opens one split written by a standalone StoreWriter."""
  return Store(path, verify=verify)
