"""The packed record store: exact round trip, shards, atomic finalise, checksums, grain, inspect."""

import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grain
from absl import flags
import numpy as np
import pytest

from consist.data import store_format
from consist.data.record import MoleculeRecord, RecordError
from consist.data.store import DatasetWriter, StoreError, StoreWriter, open_dataset, open_store

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def _positions(rng, n):
  """Atoms on a 1.5 Å grid line plus noise: never closer than the duplicate-atom threshold."""
  return (np.arange(n)[:, None] * np.array([1.5, 0.3, 0.1]) + rng.normal(0, 0.1, (n, 3))).astype(
      np.float32)


def _record(rng, i, *, n, energy, forces, ref, bonds, equilibrium):
  pos = _positions(rng, n)
  if bonds == "none":
    b = bo = None
  elif bonds == "empty" or n == 1:
    b, bo = np.zeros((0, 2), np.int32), np.zeros(0, np.float32)
  else:
    b = np.stack([np.arange(n - 1), np.arange(1, n)], 1).astype(np.int32)
    bo = rng.choice(np.array([1.0, 1.5, 2.0, 3.0], np.float32), n - 1)
  return MoleculeRecord(
      mol_id=f"mol-{i // 3}-é√☃",  # three conformations per molecule, non-ASCII ids
      atomic_numbers=rng.integers(1, 119, n).astype(np.int32),
      positions=pos,
      charge=int(rng.integers(-2, 3)),
      multiplicity=int(rng.integers(1, 4)),
      smiles="" if i % 5 == 0 else f"C[C@H](O)c1ccccc1-{i}-αβ",
      bonds=b,
      bond_orders=bo,
      energy=float(rng.normal(-1e4, 1e3)) if energy else None,
      forces=rng.normal(0, 1, (n, 3)).astype(np.float32) if forces else None,
      is_equilibrium=equilibrium,
      structure_fidelity=["", "mmff94", "pm6"][i % 3],
      label_fidelity=("gfn2-xtb" if i % 2 else "b3lyp/6-31g*") if (energy or forces) else "",
      ref_positions=(pos + 0.01).astype(np.float32) if ref else None,
      ref_fidelity="gfn2-xtb" if ref else "",
      ref_energy=float(rng.normal(-1e4, 1e3)) if ref == "with_energy" else None,
  )


def _every_combination(seed=0):
  """One record per combination of optional labels, at several sizes (single atom included)."""
  rng = np.random.default_rng(seed)
  out = []
  combos = itertools.product([False, True], [False, True], [None, "no_energy", "with_energy"],
                             ["none", "empty", "chain"], [False, True], [1, 2, 7])
  for i, (e, f, r, b, eq, n) in enumerate(combos):
    out.append(_record(rng, i, n=n, energy=e, forces=f, ref=r, bonds=b, equilibrium=eq))
  return out


def _assert_same(got: MoleculeRecord, want: MoleculeRecord):
  for field in ("mol_id", "smiles", "charge", "multiplicity", "is_equilibrium", "energy",
                "ref_energy", "structure_fidelity", "label_fidelity", "ref_fidelity"):
    assert getattr(got, field) == getattr(want, field), field
  np.testing.assert_array_equal(got.atomic_numbers, want.atomic_numbers)
  assert got.positions.dtype == np.float32
  for field in ("positions", "forces", "ref_positions", "bonds", "bond_orders"):
    g, w = getattr(got, field), getattr(want, field)
    assert (g is None) == (w is None), field
    if w is not None:
      assert g.shape == w.shape, field
      assert g.tobytes() == np.asarray(w, g.dtype).tobytes(), field  # bit-exact


def _write(path, records, **kwargs):
  with StoreWriter(path, **kwargs) as w:
    for i, r in enumerate(records):
      assert w.append(r, where=f"test #{i}") == i


def test_round_trip_exact_over_every_label_combination_and_shards(tmp_path):
  records = _every_combination()
  # Tiny shards and buffer: many shards, many flushes, and records split around both.
  _write(tmp_path / "s", records, shard_max_atoms=40, buffer_atoms=13, buffer_records=5)
  store = open_store(tmp_path / "s", verify=True)
  assert len(store) == len(records)
  assert store.summary()["shards"] > 10
  for i, want in enumerate(records):
    _assert_same(store[i], want)
  _assert_same(store[-1], records[-1])
  _assert_same(store[np.int64(3)], records[3])
  np.testing.assert_array_equal(store.n_atoms, [r.n_atoms for r in records])
  assert store.n_atoms.dtype == np.int32
  assert list(store.mol_ids()) == [r.mol_id for r in records]
  with pytest.raises(IndexError):
    store[len(records)]
  with pytest.raises(TypeError):
    store["3"]


def test_record_larger_than_shard_gets_its_own_shard(tmp_path):
  rng = np.random.default_rng(1)
  sizes = [3, 50, 2, 2]
  records = [_record(rng, i, n=n, energy=True, forces=True, ref=None, bonds="chain",
                     equilibrium=False) for i, n in enumerate(sizes)]
  _write(tmp_path / "s", records, shard_max_atoms=10)
  manifest = json.loads((tmp_path / "s" / store_format.MANIFEST).read_text())
  assert [s["n_atoms"] for s in manifest["shards"]] == [3, 50, 4]
  store = open_store(tmp_path / "s")
  for got, want in zip([store[i] for i in range(4)], records):
    _assert_same(got, want)


def test_forces_cost_nothing_for_records_without_them(tmp_path):
  rng = np.random.default_rng(2)
  records = [_record(rng, i, n=5, energy=True, forces=i == 1, ref=None, bonds="none",
                     equilibrium=True) for i in range(4)]
  _write(tmp_path / "s", records)
  files = json.loads((tmp_path / "s" / store_format.MANIFEST).read_text())["shards"][0]["files"]
  assert files["forces"]["shape"] == [5, 3]
  assert files["ref_positions"]["shape"] == [0, 3]
  assert os.path.getsize(tmp_path / "s" / files["forces"]["path"]) == 5 * 3 * 4


def test_summary_and_fidelities(tmp_path):
  h2o = MoleculeRecord(mol_id="water", atomic_numbers=np.array([8, 1, 1]),
                       positions=np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]),
                       energy=-2080.0, label_fidelity="gfn2-xtb", structure_fidelity="mmff94",
                       is_equilibrium=True, bonds=np.array([[0, 1], [0, 2]]),
                       bond_orders=np.array([1.0, 1.0]))
  ch4 = MoleculeRecord(mol_id="methane", atomic_numbers=np.array([6, 1, 1, 1, 1]),
                       positions=_positions(np.random.default_rng(0), 5),
                       forces=np.zeros((5, 3)), label_fidelity="b3lyp/6-31g*",
                       ref_positions=_positions(np.random.default_rng(1), 5), ref_fidelity="pm6")
  with DatasetWriter(tmp_path / "ds", attrs={"source": "hand"}) as ds:
    ds.split("train").append(h2o)
    ds.split("train").append(h2o.replace(positions=h2o.positions * 1.01, is_equilibrium=False))
    ds.split("test").append(ch4)
    ds.split("test").append(h2o)
  dataset = open_dataset(tmp_path / "ds")
  assert dataset.fidelities == ["b3lyp/6-31g*", "gfn2-xtb"]
  assert dataset["train"].fidelities == ["gfn2-xtb"]
  assert dataset.attrs == {"source": "hand"}
  s = dataset.summary()
  assert (s["molecules"], s["conformations"], s["atoms"]) == (2, 4, 14)
  assert s["elements"] == {"H": 10, "C": 1, "O": 3}
  assert s["labels"] == {"energy": 3, "forces": 1, "is_equilibrium": 2, "ref_positions": 1,
                         "ref_energy": 0, "bonds": 3}
  assert s["fidelity_tags"] == {"structure": {"mmff94": 3}, "label": {"b3lyp/6-31g*": 1,
                                                                      "gfn2-xtb": 3},
                                "ref": {"pm6": 1}}
  assert s["split_sizes"] == {"train": 2, "test": 2}
  assert s["splits"]["train"]["molecules"] == 1 and s["splits"]["test"]["molecules"] == 2
  assert s["units"]["forces"] == "eV/angstrom"
  with pytest.raises(KeyError, match="splits are"):
    dataset["val"]


def test_bad_record_names_where_and_leaves_writer_usable(tmp_path):
  rng = np.random.default_rng(3)
  good = _record(rng, 0, n=3, energy=True, forces=False, ref=None, bonds="chain", equilibrium=False)
  bad = good.replace(positions=np.full((3, 3), np.nan))
  with StoreWriter(tmp_path / "s") as w:
    assert w.append(good) == 0
    with pytest.raises(RecordError, match=r"input\.xyz: frame 7.*NaN"):
      w.append(bad, where="input.xyz: frame 7")
    with pytest.raises(RecordError, match="int16"):
      w.append(good.replace(charge=40000), where="frame 8")
    with pytest.raises(RecordError, match="float32"):
      w.append(good.replace(forces=np.full((3, 3), 1e39), label_fidelity="x"), where="frame 9")
    assert w.append(good) == 1
  store = open_store(tmp_path / "s")
  assert len(store) == 2 and store.summary()["fidelities"] == [good.label_fidelity]
  _assert_same(store[1], good)


def test_exception_in_writer_context_leaves_nothing(tmp_path):
  rng = np.random.default_rng(4)
  record = _record(rng, 0, n=2, energy=True, forces=True, ref=None, bonds="none",
                   equilibrium=False)
  with pytest.raises(RuntimeError):
    with DatasetWriter(tmp_path / "ds") as ds:
      ds.split("train").append(record)
      raise RuntimeError("converter crashed")
  assert list(tmp_path.iterdir()) == []

  ds = DatasetWriter(tmp_path / "ds")
  with pytest.raises(RuntimeError):
    with ds.split("val") as split:
      split.append(record)
      raise RuntimeError("converter crashed")
  with pytest.raises(StoreError, match="split 'val' was aborted"):
    ds.close()
  assert list(tmp_path.iterdir()) == []


def test_overwrite_policy(tmp_path):
  rng = np.random.default_rng(5)
  records = _every_combination()[:6]
  with DatasetWriter(tmp_path / "ds") as ds:
    for r in records:
      ds.split("train").append(r)
  with pytest.raises(StoreError, match="overwrite=True"):
    DatasetWriter(tmp_path / "ds")
  with DatasetWriter(tmp_path / "ds", overwrite=True) as ds:
    ds.split("val").append(_record(rng, 9, n=4, energy=True, forces=False, ref=None,
                                   bonds="none", equilibrium=False))
  assert list(open_dataset(tmp_path / "ds").splits) == ["val"]
  (tmp_path / "foreign").mkdir()
  (tmp_path / "foreign" / "notes.txt").write_text("mine")
  with pytest.raises(StoreError, match="not a consist"):
    StoreWriter(tmp_path / "foreign", overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "foreign"]  # no partial left over


def test_unfinished_writer_output_is_rejected(tmp_path):
  w = DatasetWriter(tmp_path / "ds")
  w.split("train").append(_every_combination()[0])
  (partial,) = tmp_path.iterdir()
  with pytest.raises(StoreError, match="unfinished writer output"):
    open_dataset(tmp_path / "ds")
  with pytest.raises(StoreError, match="no dataset.json"):
    open_dataset(partial)
  w.split("train").close()  # a finished split inside an unfinished dataset is not a store either
  with pytest.raises(StoreError, match="inside unfinished dataset writer output"):
    open_store(partial / "train")
  w.abort()
  assert list(tmp_path.iterdir()) == []


def test_checksum_detects_a_flipped_byte_and_truncation_is_named(tmp_path):
  _write(tmp_path / "s", _every_combination()[:20])
  column = tmp_path / "s" / "shard-00000" / "positions.bin"
  data = bytearray(column.read_bytes())
  data[17] ^= 0x01
  column.write_bytes(bytes(data))
  open_store(tmp_path / "s")  # cheap open checks sizes only
  with pytest.raises(StoreError, match=r"shard-00000/positions\.bin: sha256 mismatch"):
    open_store(tmp_path / "s", verify=True)
  column.write_bytes(bytes(data[:-4]))
  with pytest.raises(StoreError, match=r"positions\.bin: column file has .* truncated"):
    open_store(tmp_path / "s")[0]


def test_dataset_detects_a_replaced_split(tmp_path):
  records = _every_combination()[:4]
  for name in ("a", "b"):
    with DatasetWriter(tmp_path / name) as ds:
      ds.split("train").append(records[0 if name == "a" else 1])
  os.replace(tmp_path / "b" / "train", tmp_path / "a" / "train.new")
  (tmp_path / "a" / "train").rename(tmp_path / "a" / "train.old")
  (tmp_path / "a" / "train.new").rename(tmp_path / "a" / "train")
  with pytest.raises(StoreError, match="does not match the split recorded"):
    open_dataset(tmp_path / "a")


def test_pickle_and_grain_sources(tmp_path):
  records = _every_combination()[:30]
  _write(tmp_path / "s", records, shard_max_atoms=25)
  store = open_store(tmp_path / "s")
  store[0]  # maps a shard; the pickle must not carry it
  blob = pickle.dumps(store)
  assert len(blob) < 20_000
  clone = pickle.loads(blob)
  _assert_same(clone[29], records[29])

  ds = grain.MapDataset.source(store).map(lambda r: (r.mol_id, r.n_atoms))
  assert [ds[i] for i in range(len(records))] == [(r.mol_id, r.n_atoms) for r in records]

  sampler = grain.samplers.IndexSampler(len(store), shuffle=True, seed=3, num_epochs=1)
  loader = grain.DataLoader(data_source=store, sampler=sampler, worker_count=0)
  assert sorted(r.mol_id + str(r.n_atoms) for r in loader) == sorted(
      r.mol_id + str(r.n_atoms) for r in records)


@pytest.mark.slow
def test_grain_worker_processes_read_the_store(tmp_path):
  if not flags.FLAGS.is_parsed():  # grain workers read absl flags; pytest does not parse them
    flags.FLAGS.mark_as_parsed()
  records = _every_combination()[:12]
  _write(tmp_path / "s", records, shard_max_atoms=25)
  sampler = grain.samplers.IndexSampler(len(records), shuffle=False, num_epochs=1)
  loader = grain.DataLoader(data_source=open_store(tmp_path / "s"), sampler=sampler,
                            worker_count=2)
  got = list(loader)
  assert len(got) == len(records)
  for g, w in zip(got, records):
    _assert_same(g, w)


_KILLED_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from consist.data.record import MoleculeRecord
    from consist.data.store import DatasetWriter
    w = DatasetWriter(sys.argv[1], overwrite=True)
    split = w.split("train", buffer_records=50)
    rng = np.random.default_rng(0)
    for i in range(10**9):
      pos = np.arange(8)[:, None] * np.array([1.5, 0.2, 0.1]) + rng.normal(0, 0.05, (8, 3))
      split.append(MoleculeRecord(mol_id=f"new{i}", atomic_numbers=np.full(8, 6), positions=pos,
                                  energy=-1.0, label_fidelity="gfn2-xtb"))
      if i == 500:
        print("streaming", flush=True)
""")


def _run_and_kill(path: Path):
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], env=ENV, cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "streaming"
  time.sleep(0.3)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_killed_writer_leaves_no_valid_dataset_and_keeps_the_old_one(tmp_path):
  _run_and_kill(tmp_path / "fresh")
  with pytest.raises(StoreError, match="no such dataset.*unfinished writer output"):
    open_dataset(tmp_path / "fresh")
  (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith("fresh.partial-")]
  written = sum(f.stat().st_size for f in partial.rglob("positions.bin"))
  assert written >= 500 * 8 * 12  # killed mid-stream, after records reached the disk
  with pytest.raises(StoreError):
    open_dataset(partial)
  with pytest.raises(StoreError):
    open_store(partial / "train")
  (split_partial,) = partial.iterdir()
  with pytest.raises(StoreError, match="no manifest.json"):
    open_store(split_partial)

  old = _every_combination()[:10]
  with DatasetWriter(tmp_path / "old") as ds:
    for r in old:
      ds.split("train").append(r)
  _run_and_kill(tmp_path / "old")
  dataset = open_dataset(tmp_path / "old", verify=True)
  assert len(dataset["train"]) == len(old)
  for i, want in enumerate(old):
    _assert_same(dataset["train"][i], want)


_MEMORY_PROBE = textwrap.dedent("""
    import json, sys, numpy as np
    from consist.data.record import MoleculeRecord
    from consist.data.store import StoreWriter, open_store

    def rss_anon_kib():
      with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))

    path, n_records, n = sys.argv[1], int(sys.argv[2]), 20
    rng = np.random.default_rng(0)
    base = np.arange(n)[:, None] * np.array([1.5, 0.2, 0.1])
    z, noise = rng.integers(1, 10, (64, n)), rng.normal(0, 0.05, (64, n, 3))
    start = peak_write = rss_anon_kib()
    with StoreWriter(path, buffer_atoms=1 << 16) as w:
      for i in range(n_records):
        k = i % 64
        w.append(MoleculeRecord(mol_id=f"m{i}", atomic_numbers=z[k], positions=base + noise[k],
                                energy=float(i), forces=noise[k], label_fidelity="gfn2-xtb",
                                smiles="C" * 10))
        if i == n_records // 5:
          warm = rss_anon_kib()  # the write buffer has filled and flushed many times by now
        if i % 1000 == 0:
          peak_write = max(peak_write, rss_anon_kib())
    store = open_store(path)
    before_read = peak_read = rss_anon_kib()
    atoms = 0
    for i in range(len(store)):
      atoms += store[i].n_atoms
      if i % 1000 == 0:
        peak_read = max(peak_read, rss_anon_kib())
    print(json.dumps({"atoms": atoms, "write_growth_kib": peak_write - start,
                      "write_growth_after_warmup_kib": peak_write - warm,
                      "read_growth_kib": peak_read - before_read}))
""")


@pytest.mark.slow
def test_streaming_write_and_full_read_of_a_million_atoms_keep_memory_bounded(tmp_path):
  n_records = 50_000  # x 20 atoms = 10^6 atoms
  out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path / "s"), str(n_records)],
                       env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  result = json.loads(out.stdout)
  store_bytes = sum(p.stat().st_size for p in (tmp_path / "s").rglob("*.bin"))
  print(f"store {store_bytes / 2**20:.1f} MiB; anonymous memory growth: "
        f"write {result['write_growth_kib'] / 1024:.1f} MiB "
        f"({result['write_growth_after_warmup_kib'] / 1024:.1f} MiB after the first fifth), "
        f"read {result['read_growth_kib'] / 1024:.1f} MiB")
  assert result["atoms"] == n_records * 20
  assert store_bytes > 25e6
  # Anonymous (heap) memory, not the page cache of the mapped files, must stay far below the data.
  # The writer's buffer (a few MiB here) fills once, then memory stays flat while 80% of the data
  # is written; the reader holds no more than a few records at a time.
  assert result["write_growth_kib"] * 1024 < store_bytes / 2
  assert result["write_growth_after_warmup_kib"] * 1024 < store_bytes / 20
  assert result["read_growth_kib"] * 1024 < store_bytes / 20


def _run_inspect(*args):
  return subprocess.run([sys.executable, "-m", "launch.inspect", *map(str, args)], env=ENV,
                        cwd=REPO, capture_output=True, text=True, timeout=60)


def test_inspect_prints_summary_and_records(tmp_path):
  records = _every_combination()[:8]
  with DatasetWriter(tmp_path / "ds") as ds:
    for i, r in enumerate(records):
      ds.split("train" if i < 5 else "test").append(r)
  out = _run_inspect(tmp_path / "ds", "--verify")
  assert out.returncode == 0, out.stderr
  summary = json.loads(out.stdout)
  assert summary["split_sizes"] == {"train": 5, "test": 3} and summary["verified"] is True
  assert summary["conformations"] == 8 and summary["molecules"] == 3

  out = _run_inspect(tmp_path / "ds", "--records", "4:7")
  assert out.returncode == 0, out.stderr
  shown = json.loads(out.stdout)
  assert [(r["split"], r["index"]) for r in shown] == [("train", 4), ("test", 0), ("test", 1)]
  assert shown[1]["mol_id"] == records[5].mol_id  # unicode survives
  assert shown[1]["atomic_numbers"] == records[5].atomic_numbers.tolist()
  # float32 values print as their shortest repr, which parses back to the identical float32.
  np.testing.assert_array_equal(np.asarray(shown[1]["positions_angstrom"], np.float32), records[5].positions)

  out = _run_inspect(tmp_path / "ds", "--records", "1:2", "--split", "test")
  assert [(r["split"], r["index"]) for r in json.loads(out.stdout)] == [("test", 1)]

  for bad, message in ((("--split", "val"), "has splits ['train', 'test']"),
                       (("--records", "5:2"), "expected START:STOP"),
                       (("--records", "0:99"), "past the end (8 records)")):
    out = _run_inspect(tmp_path / "ds", *bad)
    assert out.returncode != 0 and message in out.stderr, (bad, out.stderr)
  out = _run_inspect(tmp_path / "missing")
  assert out.returncode != 0 and "no such dataset" in out.stderr

