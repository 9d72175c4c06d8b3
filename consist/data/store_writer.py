"""Streaming writers of the packed record store (layout in `consist.data.store_format`).

Memory is bounded by the write buffer (`buffer_atoms` atoms / `buffer_records` records) whatever
the dataset size. Output goes to `<path>.partial-<pid>-<rand>`; `close()` fsyncs every column,
writes the manifest last and renames the directory into place, so a writer killed mid-way leaves no
directory that `open_dataset` / `open_store` accept. With `overwrite=True` the previous complete
output stays in place until the new one is complete. Partial directories of killed writers are
left for the user to delete (`open_dataset` names them in its error).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from consist.data import store_format as fmt
from consist.data import store_summary
from consist.data.record import MoleculeRecord, RecordError

_INT16 = np.iinfo(np.int16)
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _partial_path(path: Path) -> Path:
  return path.with_name(f"{path.name}{fmt.PARTIAL_TAG}{os.getpid()}-{secrets.token_hex(3)}")


def _check_target(path: Path, overwrite: bool, marker: str) -> None:
  """Refuses to replace existing output unless `overwrite`; never replaces foreign directories."""
  if not path.exists() and not path.is_symlink():
    return
  ours = (path / fmt.MANIFEST).exists() or (path / fmt.DATASET_JSON).exists()
  if not overwrite:
    what = "a complete consist store/dataset" if (path / marker).exists() else "an existing path"
    raise fmt.StoreError(f"{path}: refusing to overwrite {what}; pass overwrite=True to replace it")
  if not path.is_dir() or (not ours and any(path.iterdir())):
    raise fmt.StoreError(
        f"{path}: exists and is not a consist store or dataset; refusing to replace it even with "
        "overwrite=True (remove it yourself)")


def _publish(partial: Path, path: Path) -> None:
  """Moves a finished partial directory to `path` (replacing an old one only now)."""
  fmt.fsync_dir(partial)
  if path.exists():
    old = path.with_name(f"{path.name}.old-{os.getpid()}-{secrets.token_hex(3)}")
    os.replace(path, old)
    os.replace(partial, path)
    shutil.rmtree(old)
  else:
    os.replace(partial, path)
  fmt.fsync_dir(path.parent)


def _json_attrs(attrs: dict | None, path: Path) -> dict:
  attrs = dict(attrs or {})
  try:
    json.dumps(attrs)
  except TypeError as e:
    raise fmt.StoreError(f"{path}: attrs must be JSON-serialisable ({e})") from None
  return attrs


class _Column:
  """One append-only column file with a running sha256 and a bounded in-memory buffer."""

  def __init__(self, path: Path, dtype: str, trailing: tuple[int, ...]):
    self.path, self.dtype, self.trailing = path, np.dtype(dtype), trailing
    self.file = open(path, "wb")
    self.sha = hashlib.sha256()
    self.rows = 0
    self.buffer: list = []

  def flush(self) -> None:
    if not self.buffer:
      return
    if isinstance(self.buffer[0], np.ndarray):
      data = np.concatenate(self.buffer).astype(self.dtype, copy=False)
    else:
      data = np.asarray(self.buffer, dtype=self.dtype)
    blob = np.ascontiguousarray(data).tobytes()
    self.file.write(blob)
    self.sha.update(blob)
    self.rows += data.shape[0]
    self.buffer = []

  def finish(self, root: Path) -> dict[str, Any]:
    self.flush()
    self.file.flush()
    os.fsync(self.file.fileno())
    self.file.close()
    shape = [self.rows, *self.trailing]
    return {"path": str(self.path.relative_to(root)), "dtype": self.dtype.str, "shape": shape,
            "bytes": self.rows * int(np.prod(self.trailing, dtype=np.int64)) * self.dtype.itemsize,
            "sha256": self.sha.hexdigest()}

  def discard(self) -> None:
    self.file.close()


class _ShardWriter:
  """Columns of one shard directory; row counters give the offsets of the next record."""

  def __init__(self, root: Path, name: str):
    self.name = name
    directory = root / name
    directory.mkdir()
    self.columns = {c: _Column(directory / f"{c}.bin", dt, shape)
                    for c, (dt, shape) in fmt.COLUMNS.items()}
    self.n_records = self.n_atoms = self.n_bonds = 0
    self.label_rows = {c: 0 for c in fmt.LABEL_COLUMNS}
    self.string_bytes = {f: 0 for f in fmt.STRING_FIELDS}
    for f in fmt.STRING_FIELDS:
      self.columns[f"{f}_offset"].buffer.append(0)

  def add(self, row: dict[str, Any]) -> None:
    cols = self.columns
    n = row["atomic_numbers"].shape[0]
    for c in fmt.ATOM_COLUMNS:
      cols[c].buffer.append(row[c])
    for c in fmt.LABEL_COLUMNS:
      if row[c] is None:
        cols[f"{c}_row"].buffer.append(-1)
      else:
        cols[f"{c}_row"].buffer.append(self.label_rows[c])
        cols[c].buffer.append(row[c])
        self.label_rows[c] += n
    cols["bond_offset"].buffer.append(self.n_bonds)
    if row["bonds"] is None:
      cols["n_bonds"].buffer.append(-1)
    else:
      cols["n_bonds"].buffer.append(row["bonds"].shape[0])
      cols["bonds"].buffer.append(row["bonds"])
      cols["bond_orders"].buffer.append(row["bond_orders"])
      self.n_bonds += row["bonds"].shape[0]
    for f in fmt.STRING_FIELDS:
      cols[f"{f}_bytes"].buffer.append(row[f])
      self.string_bytes[f] += row[f].shape[0]
      cols[f"{f}_offset"].buffer.append(self.string_bytes[f])
    cols["atom_offset"].buffer.append(self.n_atoms)
    for c in ("n_atoms", "charge", "multiplicity", "is_equilibrium", "energy", "has_energy",
              "ref_energy", "has_ref_energy", "structure_fidelity", "label_fidelity",
              "ref_fidelity", "mol_hash"):
      cols[c].buffer.append(row[c])
    self.n_records += 1
    self.n_atoms += n

  def flush(self) -> None:
    for col in self.columns.values():
      col.flush()

  def finish(self, root: Path) -> dict[str, Any]:
    files = {c: col.finish(root) for c, col in self.columns.items()}
    return {"name": self.name, "n_records": self.n_records, "n_atoms": self.n_atoms,
            "files": files}

  def discard(self) -> None:
    for col in self.columns.values():
      col.discard()


def _float32_finite(arr, name: str, fail) -> np.ndarray:
  with np.errstate(over="ignore"):
    out = np.ascontiguousarray(arr, dtype=np.float32)
  if not np.isfinite(out).all():
    fail(f"{name} overflows float32 (the stored dtype)")
  return out


class _FinalisedOnExit:
  """Context manager of a writer: close() (finalise) on normal exit, abort() on an exception."""

  _open: bool

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      self.abort()
    elif self._open:
      self.close()


class StoreWriter(_FinalisedOnExit):
  """Writes one split as a stream of records; see the module docstring for the guarantees.

  Use as a context manager (close on normal exit, abort on exception) or call close()/abort().
  """

  def __init__(self, path, *, shard_max_atoms: int = 20_000_000, overwrite: bool = False,
               attrs: dict | None = None, buffer_atoms: int = 1 << 20,
               buffer_records: int = 1 << 14):
    self.path = Path(path)
    if shard_max_atoms < 1 or buffer_atoms < 1 or buffer_records < 1:
      raise ValueError("shard_max_atoms, buffer_atoms and buffer_records must be >= 1")
    _check_target(self.path, overwrite, fmt.MANIFEST)
    self._attrs = _json_attrs(attrs, self.path)
    self._shard_max_atoms = shard_max_atoms
    self._buffer_atoms, self._buffer_records = buffer_atoms, buffer_records
    self._partial = _partial_path(self.path)
    self._partial.mkdir(parents=True)
    self._index = _Column(self._partial / fmt.INDEX_FILE, fmt.INDEX_DTYPE.str, ())
    self._shard: _ShardWriter | None = None
    self._shards: list[dict[str, Any]] = []
    self._tags: dict[str, int] = {}
    self._stats = store_summary.SummaryStats()
    self._buffered_atoms = self._buffered_records = 0
    self._open = True

  def __len__(self) -> int:
    return self._stats.records

  @property
  def closed(self) -> bool:
    """True after close() or abort()."""
    return not self._open

  def _encode(self, record: MoleculeRecord, where: str) -> dict[str, Any]:
    """Validates and converts a record to stored dtypes without touching the writer's state."""
    if not isinstance(record, MoleculeRecord):
      raise RecordError(
          f"{where or 'record'}: expected a MoleculeRecord, got {type(record).__name__}")
    record.validate(where)

    def fail(msg: str):
      raise RecordError(f"{where or 'record'} (mol_id={record.mol_id!r}): {msg}", "unstorable_value")

    for name in ("mol_id", "smiles", "structure_fidelity", "label_fidelity", "ref_fidelity"):
      if not isinstance(getattr(record, name), str):
        fail(f"{name} must be a str, got {type(getattr(record, name)).__name__}")
    new_tags = {t for k in fmt.FIDELITY_KINDS if (t := getattr(record, f"{k}_fidelity"))}
    if len(self._tags) + len(new_tags - set(self._tags)) > fmt.MAX_FIDELITY_TAGS:
      fail(f"more than {fmt.MAX_FIDELITY_TAGS} distinct fidelity tags in one split")
    for name in ("charge", "multiplicity"):
      v = getattr(record, name)
      if int(v) != v or not _INT16.min <= v <= _INT16.max:
        fail(f"{name}={v} is not an integer in the stored int16 range")
    row: dict[str, Any] = {
        "atomic_numbers": np.asarray(record.atomic_numbers).astype(np.uint8),
        "positions": _float32_finite(record.positions, "positions", fail),
        "forces": None if record.forces is None else _float32_finite(record.forces, "forces", fail),
        "ref_positions": (None if record.ref_positions is None
                          else _float32_finite(record.ref_positions, "ref_positions", fail)),
        "bonds": None if record.bonds is None else np.asarray(record.bonds).astype(np.int32),
        "bond_orders": (None if record.bond_orders is None
                        else _float32_finite(record.bond_orders, "bond_orders", fail)),
        "n_atoms": record.n_atoms,
        "charge": int(record.charge),
        "multiplicity": int(record.multiplicity),
        "is_equilibrium": bool(record.is_equilibrium),
        "energy": 0.0 if record.energy is None else float(record.energy),
        "has_energy": record.energy is not None,
        "ref_energy": 0.0 if record.ref_energy is None else float(record.ref_energy),
        "has_ref_energy": record.ref_energy is not None,
        "mol_hash": fmt.mol_hash(record.mol_id),
    }
    for f in fmt.STRING_FIELDS:
      try:
        row[f] = np.frombuffer(getattr(record, f).encode("utf-8"), np.uint8)
      except UnicodeEncodeError as e:
        fail(f"{f} is not encodable as utf-8 ({e})")
    return row

  def append(self, record: MoleculeRecord, *, where: str = "") -> int:
    """Validates and appends one record; returns its index. A failed append writes nothing."""
    if not self._open:
      raise fmt.StoreError(f"{self.path}: writer is already closed or aborted")
    row = self._encode(record, where)
    for kind in fmt.FIDELITY_KINDS:
      tag = getattr(record, f"{kind}_fidelity")
      row[f"{kind}_fidelity"] = self._tags.setdefault(tag, len(self._tags)) if tag else -1
    n = row["n_atoms"]
    if self._shard is not None and self._shard.n_atoms + n > self._shard_max_atoms:
      self._close_shard()
    if self._shard is None:
      self._shard = _ShardWriter(self._partial, f"shard-{len(self._shards):05d}")
    self._shard.add(row)
    self._index.buffer.append(n)
    index = self._stats.records
    self._stats.add(record, row["atomic_numbers"])
    self._buffered_atoms += n
    self._buffered_records += 1
    if self._buffered_atoms >= self._buffer_atoms or self._buffered_records >= self._buffer_records:
      self._flush()
    return index

  def _flush(self) -> None:
    if self._shard is not None:
      self._shard.flush()
    self._index.flush()
    self._buffered_atoms = self._buffered_records = 0

  def _close_shard(self) -> None:
    self._shards.append(self._shard.finish(self._partial))
    self._shard = None

  def close(self) -> dict[str, Any]:
    """Finalises atomically (fsync, checksums, manifest last, rename); returns the summary."""
    if not self._open:
      raise fmt.StoreError(f"{self.path}: writer is already closed or aborted")
    self._open = False
    try:
      if self._shard is not None:
        self._close_shard()
      index = self._index.finish(self._partial)
      hashes = [fmt.map_column(self._partial / s["files"]["mol_hash"]["path"],
                               fmt.COLUMNS["mol_hash"][0], s["files"]["mol_hash"]["shape"])
                for s in self._shards]
      files = {f["path"]: f for s in self._shards for f in s["files"].values()}
      files[index["path"]] = index
      manifest = {
          "format": fmt.STORE_FORMAT,
          "schema_version": fmt.SCHEMA_VERSION,
          "n_records": self._stats.records,
          "n_atoms": self._stats.atoms,
          "units": fmt.UNITS,
          "fidelity_tags": list(self._tags),
          "stats": self._stats.to_json(molecules=fmt.count_unique(hashes)),
          "index": index,
          "shards": self._shards,
          "checksum": fmt.content_checksum(files),
          "attrs": self._attrs,
      }
      del hashes
      fmt.write_json_durably(self._partial / fmt.MANIFEST, manifest)
      _publish(self._partial, self.path)
    except BaseException:
      shutil.rmtree(self._partial, ignore_errors=True)
      raise
    return store_summary.split_summary(manifest, self.path)

  def abort(self) -> None:
    """Discards everything written (the previous output at `path`, if any, is untouched)."""
    if self._open:
      self._open = False
      if self._shard is not None:
        self._shard.discard()
      self._index.discard()
    shutil.rmtree(self._partial, ignore_errors=True)


class DatasetWriter(_FinalisedOnExit):
  """Writes a dataset: `dataset.json` plus one StoreWriter sub-directory per split."""

  def __init__(self, path, *, overwrite: bool = False, attrs: dict | None = None):
    self.path = Path(path)
    _check_target(self.path, overwrite, fmt.DATASET_JSON)
    self._attrs = _json_attrs(attrs, self.path)
    self._partial = _partial_path(self.path)
    self._partial.mkdir(parents=True)
    self._splits: dict[str, StoreWriter] = {}
    self._split_kwargs: dict[str, dict[str, Any]] = {}
    self._open = True

  def split(self, name: str, **store_kwargs) -> StoreWriter:
    """The writer of split `name` (created on first use; store_kwargs apply then)."""
    if not self._open:
      raise fmt.StoreError(f"{self.path}: dataset writer is already closed or aborted")
    if name not in self._splits:
      if not isinstance(name, str) or not _SPLIT_NAME.match(name) or fmt.PARTIAL_TAG in name:
        raise ValueError(f"{self.path}: invalid split name {name!r} (use letters, digits, _ . -)")
      self._splits[name] = StoreWriter(self._partial / name, **store_kwargs)
      self._split_kwargs[name] = store_kwargs
    elif store_kwargs and store_kwargs != self._split_kwargs[name]:
      raise ValueError(f"{self.path}: split {name!r} was created with {self._split_kwargs[name]}, "
                       f"not {store_kwargs}")
    return self._splits[name]

  def close(self) -> dict[str, Any]:
    """Closes open splits, writes dataset.json last and renames into place; returns the summary."""
    if not self._open:
      raise fmt.StoreError(f"{self.path}: dataset writer is already closed or aborted")
    self._open = False
    try:
      if not self._splits:
        raise fmt.StoreError(f"{self.path}: no split was written; nothing to finalise")
      for name, writer in self._splits.items():
        if not writer.closed:
          writer.close()
        elif not (self._partial / name / fmt.MANIFEST).exists():
          raise fmt.StoreError(f"{self.path}: split {name!r} was aborted; dataset not written")
      manifests = {name: fmt.read_json(self._partial / name / fmt.MANIFEST, "manifest")
                   for name in self._splits}
      hashes = [fmt.map_column(self._partial / name / f["path"], f["dtype"], f["shape"])
                for name, m in manifests.items()
                for f in (s["files"]["mol_hash"] for s in m["shards"])]
      molecules = fmt.count_unique(hashes)
      del hashes
      meta = {
          "format": fmt.DATASET_FORMAT,
          "schema_version": fmt.SCHEMA_VERSION,
          "splits": {name: {"n_records": m["n_records"], "checksum": m["checksum"]}
                     for name, m in manifests.items()},
          "units": fmt.UNITS,
          "stats": store_summary.merge_stats([m["stats"] for m in manifests.values()], molecules),
          "attrs": self._attrs,
      }
      fmt.write_json_durably(self._partial / fmt.DATASET_JSON, meta)
      _publish(self._partial, self.path)
    except BaseException:
      self.abort()
      raise
    return store_summary.dataset_summary(meta, manifests, self.path)

  def abort(self) -> None:
    """Discards everything written (the previous dataset at `path`, if any, is untouched)."""
    self._open = False
    for writer in self._splits.values():
      writer.abort()
    shutil.rmtree(self._partial, ignore_errors=True)
