"""A store damaged after it was written: a column file deleted or truncated is caught on open (sizes
against the manifest); one overwritten in place is caught on the first read of a bad record, which
names it, before training sees it; --verify names the file."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from consist.data.budgets import Buckets
from consist.data.batching import Budget
from consist.data.pipeline import InputPipeline
from consist.data.record import MoleculeRecord
from consist.data.store import DatasetWriter, StoreError, open_dataset

REPO = Path(__file__).resolve().parents[1]


def _dataset(tmp_path: Path, n: int = 12) -> Path:
  rng = np.random.default_rng(0)
  out = tmp_path / "data"
  with DatasetWriter(out) as ds:
    for i in range(n):
      pos = np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]) + rng.normal(0, 0.02, (3, 3))
      ds.split("train").append(MoleculeRecord(
          mol_id=f"water-{i}", atomic_numbers=np.array([8, 1, 1]), positions=pos, energy=-14.0 - i,
          forces=rng.normal(0, 0.1, (3, 3)), label_fidelity="x"))
  return out


def _inspect(path: Path, *args) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "launch.inspect", str(path), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_missing_or_truncated_column_file_fails_on_open(tmp_path, damage):
  data = _dataset(tmp_path)
  column = data / "train" / "shard-00000" / "forces.bin"
  if damage == "delete":
    column.unlink()
  else:
    column.write_bytes(column.read_bytes()[:-8])
  with pytest.raises(StoreError, match=rf"shard-00000/forces\.bin: column file .*(missing|truncated)"):
    open_dataset(data)
  out = _inspect(data)
  assert out.returncode != 0 and "forces.bin" in out.stderr and "Traceback" not in out.stderr
  assert not out.stdout.strip()  # no summary of a damaged store


def test_values_overwritten_in_place_are_refused_naming_the_record(tmp_path):
  data = _dataset(tmp_path)
  column = data / "train" / "shard-00000" / "positions.bin"
  positions = np.fromfile(column, dtype="<f4").reshape(-1, 3)
  positions[3 * 5 + 1] = 1e35  # record 5, atom 1
  positions.tofile(column)  # same size: only the checksum sees it
  store = open_dataset(data)["train"]
  assert store[4].mol_id == "water-4"
  with pytest.raises(StoreError, match=r"train: record 5 \(mol_id='water-5'\): positions hold 1e\+35 Å.*damaged"):
    store[5]  # pylint: disable=pointless-statement
  pipe = InputPipeline(store, Buckets((Budget(16, 64, 5),)), fidelities=["x"], process_index=0,
                       process_count=1, local_device_count=1)
  with pytest.raises(StoreError, match=r"record 5 \(mol_id='water-5'\)"):
    for _ in pipe.eval_iterator():
      pass
  with pytest.raises(StoreError, match=r"positions\.bin: sha256 mismatch"):
    open_dataset(data, verify=True)


def test_nonfinite_energy_overwritten_in_place_is_refused(tmp_path):
  data = _dataset(tmp_path)
  column = data / "train" / "shard-00000" / "energy.bin"
  energy = np.fromfile(column, dtype="<f8")
  energy[7] = np.nan
  energy.tofile(column)
  with pytest.raises(StoreError, match=r"record 7 \(mol_id='water-7'\): energy = nan"):
    open_dataset(data)["train"][7]  # pylint: disable=expression-not-assigned
