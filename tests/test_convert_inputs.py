"""launch.convert on the inputs a new user gives it: inputs are opened read-only and never modified,
a file of another kind is named with what it looks like, splits for training, unit warnings."""

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import rdDistGeom
from rdkit.Chem.Scaffolds import MurckoScaffold

from consist.data.convert import ConversionError, convert_to_dataset
from consist.data.store import open_dataset

FIXTURES = Path(__file__).parent / "fixtures" / "convert"
REPO = Path(__file__).parents[1]
SMILES = ["CCO", "CC(C)O", "CCCO", "c1ccccc1", "Cc1ccccc1", "Oc1ccccc1", "c1ccncc1", "Cc1ccncc1",
          "C1CCCCC1", "CC1CCCCC1", "C1CCOC1", "CC1CCOC1", "CC=O", "CC(=O)O", "CN", "CCN", "c1ccoc1",
          "Cc1ccoc1", "C1CC1", "CC1CC1"]


def _sha(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(*args) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "launch.convert", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=env)


# --- item 1: never write into the input --------------------------------------------------------


def _foreign_sqlite(path: Path) -> Path:
  con = sqlite3.connect(path)
  con.execute("CREATE TABLE measurements (id INTEGER, value REAL)")
  con.execute("INSERT INTO measurements VALUES (1, 2.5)")
  con.commit()
  con.close()
  return path


@pytest.mark.parametrize("make", ["foreign", "empty"])
def test_asedb_input_that_is_not_an_ase_database_is_left_untouched(tmp_path, make):
  db = tmp_path / "data.db"
  if make == "foreign":
    _foreign_sqlite(db)
  else:
    db.write_bytes(b"")
  before, size = _sha(db), db.stat().st_size
  with pytest.raises(ConversionError, match=r"data\.db: not an ASE database") as e:
    convert_to_dataset("asedb", db, tmp_path / "out")
  assert ("tables: measurements" in str(e.value)) if make == "foreign" else ("empty" in str(e.value))
  assert _sha(db) == before and db.stat().st_size == size
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data.db"]  # no journal, lock or output left


def test_asedb_real_database_is_read_without_modification(tmp_path):
  db = tmp_path / "frames.db"
  db.write_bytes((FIXTURES / "frames.db").read_bytes())
  os.chmod(db, 0o444)  # a read-only file reads (ASE would open it for writing)
  before = _sha(db)
  report = convert_to_dataset("asedb", db, tmp_path / "out", fidelity="pbe/def2-svp")
  assert report["written"] == 3 and _sha(db) == before


# --- item 8: the wrong kind of file is named ---------------------------------------------------


def test_wrong_kind_of_input_is_named_with_a_suggestion(tmp_path):
  with pytest.raises(ConversionError, match=r"frames\.db: not a text extxyz file \(it looks like an SQLite "
                                            r"database: try --format asedb\)"):
    convert_to_dataset("extxyz", FIXTURES / "frames.db", tmp_path / "a", fidelity="x")
  binary = tmp_path / "blob.extxyz"
  binary.write_bytes(bytes(range(256)) * 4)
  with pytest.raises(ConversionError, match=r"blob\.extxyz: not a text extxyz file"):
    convert_to_dataset("extxyz", binary, tmp_path / "b", fidelity="x")
  with pytest.raises(ConversionError, match=r"frames\.extxyz: not an ASE database \(it looks like \(extended\) "
                                            r"XYZ text: try --format extxyz\)"):
    convert_to_dataset("asedb", FIXTURES / "frames.extxyz", tmp_path / "c")
  for fmt in ("extxyz", "asedb", "spice", "pcqm4mv2"):
    with pytest.raises(ConversionError, match=rf"{tmp_path.name}: is a directory; --format {fmt} reads one file"):
      convert_to_dataset(fmt, tmp_path, tmp_path / "d")
  with pytest.raises(ConversionError, match=r"frames\.extxyz: not a readable HDF5 file \(it looks like"):
    convert_to_dataset("spice", FIXTURES / "frames.extxyz", tmp_path / "e")
  assert not any((tmp_path / n).exists() for n in "abcde")

  out = _cli("--format=extxyz", f"--input={binary}", f"--out={tmp_path / 'f'}", "--fidelity=x")
  assert out.returncode == 1 and "Traceback" not in out.stderr and "codec" not in out.stderr
  assert out.stderr.strip() == (f"launch.convert: error: {binary}: not a text extxyz file "
                                "(it looks like binary data)")


# --- item 9: coordinates that are probably not in Å --------------------------------------------


def _molecules(tmp_path: Path, scale: float = 1.0, conformers: int = 1) -> Path:
  frames = []
  for i, smi in enumerate(SMILES):
    mol = Chem.AddHs(Chem.MolFromSmiles(smi))
    for k in range(conformers):
      params = rdDistGeom.ETKDGv3()
      params.randomSeed = 7 * i + k
      assert rdDistGeom.EmbedMolecule(mol, params) == 0
      atoms = ase.Atoms(numbers=[a.GetAtomicNum() for a in mol.GetAtoms()],
                        positions=mol.GetConformer().GetPositions() * scale)
      atoms.info.update(mol_id=f"m{i}", smiles=smi)
      frames.append(atoms)
  path = tmp_path / f"mols_{scale}_{conformers}.extxyz"
  ase.io.write(path, frames, format="extxyz")
  return path


def test_bohr_labelled_as_angstrom_warns(tmp_path, capsys):
  ok = convert_to_dataset("extxyz", _molecules(tmp_path), tmp_path / "ok")
  assert ok["warnings"] == [] and "warning" not in capsys.readouterr().err
  bohr = convert_to_dataset("extxyz", _molecules(tmp_path, scale=1 / 0.529177), tmp_path / "bohr")
  assert len(bohr["warnings"]) == 1 and "bohr" in bohr["warnings"][0]
  assert "median shortest interatomic distance" in capsys.readouterr().err
  saved = json.loads((tmp_path / "bohr" / "conversion_report.json").read_text())
  assert saved["warnings"] == bohr["warnings"]


# --- item 6: train / val / test for training ---------------------------------------------------


@pytest.mark.parametrize("split_by", ["molecule", "scaffold"])
def test_split_fractions_write_train_val_test_without_leaks(tmp_path, split_by):
  src = _molecules(tmp_path, conformers=2)
  report = convert_to_dataset("extxyz", src, tmp_path / "out", split_fractions="0.7,0.15,0.15",
                              split_by=split_by)
  dataset = open_dataset(tmp_path / "out")
  assert sorted(dataset.splits) == ["test", "train", "val"]
  assert report["splits"] == {n: len(dataset[n]) for n in ("train", "val", "test")}
  assert sum(report["splits"].values()) == 2 * len(SMILES) and min(report["splits"].values()) >= 2
  from consist.data.convert import splits  # pylint: disable=g-import-not-at-top
  key = {"molecule": lambda r: r.mol_id,
         "scaffold": lambda r: MurckoScaffold.MurckoScaffoldSmiles(r.smiles) or splits.ACYCLIC}[split_by]
  seen = {}
  for name, store in dataset.splits.items():
    for i in range(len(store)):
      assert seen.setdefault(key(store[i]), name) == name, f"{key(store[i])} in two splits"
  again = convert_to_dataset("extxyz", src, tmp_path / "again", split_fractions="0.7,0.15,0.15",
                             split_by=split_by)
  assert again["splits"] == report["splits"]  # deterministic


def test_split_flags_and_existing_output_name_the_flag(tmp_path):
  src = _molecules(tmp_path)
  out = tmp_path / "data"
  ok = _cli("--format=extxyz", f"--input={src}", f"--out={out}", "--split_fractions=0.8,0.1,0.1")
  assert ok.returncode == 0, ok.stderr
  assert sorted(open_dataset(out).splits) == ["test", "train", "val"]
  again = _cli("--format=extxyz", f"--input={src}", f"--out={out}")
  assert again.returncode == 2 and "overwrite=True" not in again.stderr
  assert f"--out={out}: already holds a dataset" in again.stderr and "--overwrite" in again.stderr
  bad = _cli("--format=extxyz", f"--input={src}", f"--out={tmp_path / 'x'}", "--split_fractions=0.8,0.3")
  assert bad.returncode == 2 and "--split_fractions=" in bad.stderr and "sum to 1.1" in bad.stderr
  two = tmp_path / "two.extxyz"  # two molecules cannot make three splits
  two.write_text("".join((FIXTURES / "frames.extxyz").read_text().splitlines(keepends=True)[:9]))
  with pytest.raises(ConversionError, match=r"2 molecule group\(s\) \(2 records\) cannot fill split\(s\) \['test'\]"):
    convert_to_dataset("extxyz", two, tmp_path / "y", fidelity="x", split_fractions=(0.9, 0.05, 0.05))
  assert not (tmp_path / "y").exists()


def test_training_on_a_single_split_conversion_says_how_to_split(tmp_path):
  data = tmp_path / "data"
  convert_to_dataset("extxyz", _molecules(tmp_path), data)
  env = dict(os.environ, PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/smoke.py",
                        f"--workdir={tmp_path / 'run'}", f"--config.data.path={data}",
                        "--config.loss.energy_weight=0", "--config.loss.forces_weight=0",
                        "--config.loss.denoise_weight=0"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  error = [l for l in out.stderr.splitlines() if "error" in l]
  assert len(error) == 1 and error[0].startswith("launch.train: error: --config.data.val_split: ")
  assert "no split 'val'" in error[0] and "--split_fractions" in error[0]
