"""The multi-fidelity dataset builder: per-molecule pipeline, split, journal/resume, bundled data."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rdkit import Chem

from consist.build import builder, molecule, split, topology
from consist.build.molecule import BuildSettings, MoleculeBuilder
from consist.data.bundled import BUNDLED_DATASET, REPO_ROOT, SMOKE_DATASET
from consist.levels import get_level
from consist.units import BOLTZMANN_EV_PER_K

TINY = ["CCO", "c1ccccc1O", "CC(=O)N", "not_a_smiles", "[Na+].[Cl-]", "[CH3]", "CCOC(=O)C",
        "c1ccncc1", "OC1CCCC1", "FC(F)Cl", "CC#N", "C1CCOC1", "Cc1ccc(Br)cc1", "CS(=O)C",
        "NC(=O)c1ccccc1", "C1CC1C(=O)O"]


def _write_smi(path: Path, smiles) -> Path:
  path.write_text("# test source\n" + "".join(f"{s}\tmol-{i:03d}\ttest\n" for i, s in enumerate(smiles)))
  return path


def test_molecule_pipeline_labels_and_failures():
  b = MoleculeBuilder(BuildSettings(offeq_temperatures=(100.0, 300.0)))
  ok = b("CC(=O)OC", "m0", "val")
  assert not ok.failure, ok.detail
  eq, *offeq = ok.records
  assert eq.is_equilibrium and eq.structure_fidelity == "mmff94" and eq.label_fidelity == "gfn2-xtb"
  assert eq.positions.dtype == np.float32 and eq.forces.dtype == np.float32
  assert offeq == []  # off-equilibrium samples are for the training split only
  # The reference minimum: converged at the accurate level at the stored float32 coordinates,
  # lower in energy than the cheap structure, same bond graph.
  xtb = get_level("gfn2-xtb")
  e_ref, f_ref = xtb.energy_forces(eq.atomic_numbers, eq.ref_positions.astype(np.float64))
  assert np.linalg.norm(f_ref, axis=1).max() <= 0.01
  assert e_ref == pytest.approx(eq.ref_energy, abs=1e-6) and eq.ref_energy < eq.energy
  mol = Chem.AddHs(Chem.MolFromSmiles("CC(=O)OC"))
  assert topology.topology_difference(mol, eq.ref_positions) == ""
  # MMFF's own minimum: tiny MMFF forces there.
  _, f_cheap = get_level("mmff94").energy_forces(eq.atomic_numbers, eq.positions, bonds=mol)
  assert np.linalg.norm(f_cheap, axis=1).max() < 0.01

  train = b("CC(=O)OC", "m0", "train").records
  assert len(train) == 3 and train[0].ref_positions is None
  for rec, t in zip(train[1:], (100.0, 300.0)):
    assert not rec.is_equilibrium and rec.energy > train[0].energy
    disp = np.sqrt(np.mean(np.sum((rec.positions - train[0].positions) ** 2, axis=1)))
    assert 0.005 < disp < 0.2, f"{t} K sample moved atoms by {disp:.3f} Å RMS"

  failures = {s: b(s, "x", "train") for s in ("not_a_smiles", "[Na+].[Cl-]", "[CH3]")}
  assert failures["not_a_smiles"].failure == molecule.REASON_SMILES
  assert failures["[Na+].[Cl-]"].failure == "element not supported by level"
  assert failures["[CH3]"].failure == "charged/open-shell unsupported"
  assert all(not r.records for r in failures.values())


def test_results_are_deterministic_per_smiles():
  b = MoleculeBuilder(BuildSettings())
  r1, r2 = b("OC1CCCC1", "a", "train"), b("OC1CCCC1", "a", "train")
  for a, c in zip(r1.records, r2.records, strict=True):
    np.testing.assert_array_equal(a.positions, c.positions)
    assert a.energy == c.energy


def test_thermal_displacements_follow_boltzmann_covariance():
  # A 3-atom toy: diagonal Hessian with 6 zero (rigid) modes and stiffnesses k.
  k = np.array([0.0] * 6 + [1.0, 10.0, 40.0])
  hess = np.diag(k)
  rng = np.random.default_rng(0)
  samples = molecule.thermal_displacements(hess, [300.0] * 4000, rng, min_curvature=2.0, n_rigid=6)
  x = np.stack([s.ravel() for s in samples])
  kt = BOLTZMANN_EV_PER_K * 300.0
  np.testing.assert_allclose(x[:, :6].std(axis=0), 0.0, atol=1e-12)  # rigid modes untouched
  expected = np.sqrt(kt / np.maximum(k[6:], 2.0))  # soft mode capped at the floor
  np.testing.assert_allclose(x[:, 6:].std(axis=0), expected, rtol=0.06)


def test_topology_check_detects_broken_bond():
  mol = Chem.AddHs(Chem.MolFromSmiles("CO"))
  from rdkit.Chem import rdDistGeom  # pylint: disable=g-import-not-at-top
  rdDistGeom.EmbedMolecule(mol, randomSeed=1)
  pos = mol.GetConformer().GetPositions()
  assert topology.topology_difference(mol, pos) == ""
  far = pos.copy()
  far[1] += 3.0 * (pos[1] - pos[0]) / np.linalg.norm(pos[1] - pos[0])  # pull O away from C
  assert "broken bonds [(0, 1)" in topology.topology_difference(mol, far)


def test_scaffold_split_is_deterministic_and_keeps_scaffolds_together():
  smiles = ["c1ccccc1C", "c1ccccc1O", "c1ccccc1N", "C1CCCCC1O", "C1CCCCC1N", "C1CCOC1C",
            "c1ccncc1C", "c1ccncc1O", "CCO", "CCN", "CCC", "C1CC1O", "c1ccoc1", "c1ccsc1"] * 3
  fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
  a = split.scaffold_split(smiles, fractions, seed=0)
  assert a == split.scaffold_split(smiles, fractions, seed=0)
  by_scaffold = {}
  for s, name in zip(smiles, a):
    assert by_scaffold.setdefault(split.scaffold(s), name) == name
  assert set(a) == {"train", "val", "test"}


def _spec(tmp_path: Path, name: str, source: Path, workers: int = 1) -> builder.BuildSpec:
  return builder.BuildSpec(source=str(source), out=str(tmp_path / name), workdir=str(tmp_path / f"{name}.work"),
                           split_fractions=(("train", 0.6), ("val", 0.2), ("test", 0.2)),
                           settings=BuildSettings(offeq_fraction=0.5), chunk_size=3, workers=workers)


def test_build_writes_dataset_with_failures_and_no_train_references(tmp_path):
  from consist.data.store import open_dataset  # pylint: disable=g-import-not-at-top
  source = _write_smi(tmp_path / "tiny.smi", TINY)
  spec = _spec(tmp_path, "ds", source)
  attrs = builder.build(spec, log=lambda m: None)
  ds = open_dataset(spec.out)
  counts = attrs["failures"]["counts"]
  assert counts == {"charged/open-shell unsupported": 1, "element not supported by level": 1,
                    "invalid smiles": 1}
  assert [f[1] for f in attrs["failures"]["molecules"]] == ["not_a_smiles", "[Na+].[Cl-]", "[CH3]"]
  n_mol = {name: len(set(ds[name].mol_ids())) for name in ("train", "val", "test")}
  assert sum(n_mol.values()) == len(TINY) - 3 and min(n_mol.values()) >= 1
  train = [ds["train"][i] for i in range(len(ds["train"]))]
  assert all(r.ref_positions is None for r in train)
  assert any(not r.is_equilibrium for r in train)
  for name in ("val", "test"):
    assert all(ds[name][i].ref_positions is not None for i in range(len(ds[name])))
  assert ds.attrs["levels"]["accurate"] == "gfn2-xtb" and ds.attrs["settings"]["seed"] == 0
  # A second run re-uses the journal (nothing recomputed) and refuses a different plan.
  logs = []
  builder.build(spec, overwrite=True, log=logs.append)
  assert logs[0].startswith("6/6 chunks already journaled")
  changed = builder.BuildSpec(**{**spec.__dict__, "settings": BuildSettings(seed=1)})
  with pytest.raises(ValueError, match="different plan"):
    builder.build(changed, overwrite=True)


def _records(path):
  from consist.data.store import open_dataset  # pylint: disable=g-import-not-at-top
  ds = open_dataset(path)
  return ds.attrs, {name: [ds[name][i].to_json() for i in range(len(ds[name]))] for name in ds.splits}


@pytest.mark.slow
def test_killed_build_resumes_to_identical_dataset(tmp_path):
  source = _write_smi(tmp_path / "tiny.smi", TINY + ["CCCC(=O)O", "c1ccc2ccccc2c1", "CC(C)O",
                                                      "OCC(O)CO", "CN1CCCC1", "ClCCl"])
  cmd = [sys.executable, "-m", "launch.build_dataset", "--config", "configs/dataset_pilot.py",
         f"--config.source={source}", "--config.n_molecules=0", "--config.chunk_size=2",
         "--config.workers=2"]
  env = {**os.environ, "OMP_NUM_THREADS": "1"}

  def run(name, kill_after_chunks=None):
    args = cmd + [f"--config.out={tmp_path / name}", f"--config.workdir={tmp_path / name}.work"]
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    if kill_after_chunks is not None:
      chunks = tmp_path / f"{name}.work" / "chunks"
      deadline = time.time() + 120
      while len(list(chunks.glob("chunk-*.pkl"))) < kill_after_chunks and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
      os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its worker processes
      proc.wait()
      assert not (tmp_path / name).exists(), "a killed build must not leave a dataset"
      return len(list(chunks.glob("chunk-*.pkl")))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()
    return out.decode()

  done = run("killed", kill_after_chunks=3)
  assert 3 <= done < 11
  log = run("killed")
  assert f"{done}/11 chunks already journaled" in log
  run("clean")
  assert _records(tmp_path / "killed") == _records(tmp_path / "clean")


def test_bundled_dataset_sizes_and_reference_minima():
  """Acceptance: bundled sizes (issue 3) and converged reference minima (sampled)."""
  from consist.data.store import open_dataset  # pylint: disable=g-import-not-at-top
  ds = open_dataset(BUNDLED_DATASET)
  train = ds["train"]
  assert len(set(train.mol_ids())) >= 5000
  mol_ids = train.mol_ids()
  offeq = np.array([not train[i].is_equilibrium for i in range(len(train))])
  ids, counts = np.unique(mol_ids[offeq], return_counts=True)
  assert (counts >= 3).sum() >= 2000
  fmax = ds.attrs["settings"]["ref_fmax"]
  xtb = get_level(ds.attrs["levels"]["accurate"])
  rng = np.random.default_rng(1)
  for name in ("val", "test"):
    store = ds[name]
    assert len(set(store.mol_ids())) >= 500
    for i in rng.choice(len(store), size=10, replace=False):
      r = store[int(i)]
      assert r.ref_positions is not None and r.ref_fidelity == xtb.name
      e, f = xtb.energy_forces(r.atomic_numbers, r.ref_positions.astype(np.float64))
      assert np.linalg.norm(f, axis=1).max() <= fmax, f"{r.mol_id}: reference minimum not converged"
      assert abs(e - r.ref_energy) < 1e-4


def test_smoke_is_a_subset_of_bundled():
  from consist.data.store import open_dataset  # pylint: disable=g-import-not-at-top
  smoke, bundled = open_dataset(SMOKE_DATASET), open_dataset(BUNDLED_DATASET)
  assert {k: len(set(smoke[k].mol_ids())) for k in smoke.splits} == {"train": 64, "val": 16, "test": 16}
  assert smoke.attrs["levels"] == bundled.attrs["levels"]
  first = smoke["val"][0]
  np.testing.assert_array_equal(first.ref_positions, bundled["val"][0].ref_positions)


def test_dft_gold_set_is_at_the_paper_level():
  """The B3LYP/6-31G* gold set (configs/dataset_dft_gold.py): small molecules, DFT labels and minima."""
  from consist.data.store import open_dataset  # pylint: disable=g-import-not-at-top
  ds = open_dataset(REPO_ROOT / "data" / "dft_gold")
  assert ds.attrs["levels"]["accurate"] == "b3lyp/6-31g*"
  n_mol = 0
  for name in ("train", "val", "test"):
    store = ds[name]
    n_mol += len(set(store.mol_ids()))
    for i in range(len(store)):
      r = store[i]
      assert r.label_fidelity == "b3lyp/6-31g*" and r.forces is not None
      assert (np.asarray(r.atomic_numbers) > 1).sum() <= 5
      assert (r.ref_positions is not None) == (name != "train")
      if r.ref_positions is not None:
        assert r.ref_fidelity == "b3lyp/6-31g*" and r.ref_energy < r.energy
  assert n_mol >= 20
