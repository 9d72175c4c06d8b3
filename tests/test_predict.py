"""launch.predict: SMILES / SDF / XYZ in, SDF / extended XYZ out, bad molecules reported, others predicted."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from rdkit import Chem

from consist import inference
from consist.inference import Sampling
from consist.predict import molecules, run, writers

REPO = Path(__file__).resolve().parents[1]

# 50 common small molecules (H, C, N, O, F, S, Cl, Br: the elements of data/smoke).
COMMON_SMILES = [
    "O", "C", "CC", "CCC", "CCCC", "CC(C)C", "C=C", "C#C", "CO", "CCO",
    "CC(C)O", "CC(C)=O", "CC=O", "C=O", "OC=O", "CC(=O)O", "COC(C)=O", "CCOC(C)=O", "CCOCC", "C1CCOC1",
    "C1COCCO1", "c1ccccc1", "Cc1ccccc1", "Oc1ccccc1", "Nc1ccccc1", "c1ccncc1", "c1cc[nH]c1", "c1ccoc1",
    "c1ccsc1", "c1c[nH]cn1", "N", "CN", "CNC", "CN(C)C", "CC#N", "CC(N)=O", "NC(N)=O", "CN(C)C=O",
    "CS(C)=O", "CSC", "CS", "ClCCl", "ClC(Cl)Cl", "Fc1ccccc1", "Brc1ccccc1", "C1CCCCC1",
    "OC(=O)c1ccccc1", "CC(=O)Nc1ccc(O)cc1", "NCC(=O)O", "Cn1cnc2c1c(=O)n(C)c(=O)n2C",
]


from predict_model import model, workdir  # noqa: E402,F401  (the shared smoke-model fixtures)


def _adjacency(mol: Chem.Mol) -> np.ndarray:
  return Chem.GetAdjacencyMatrix(mol, useBO=True)


def test_50_smiles_to_sdf_keeps_connectivity(model, tmp_path, capsys):
  assert len(set(COMMON_SMILES)) == 50
  out = tmp_path / "pred.sdf"
  report = run.predict_to_file(model, molecules.read_smiles(COMMON_SMILES), out, Sampling(mode="refine"))
  assert not report.failures and report.n_predicted == 50
  assert "prepare 50/50" in capsys.readouterr().err  # the progress bar
  assert sorted(os.listdir(tmp_path)) == ["pred.sdf"]  # no temporary file left behind

  back = list(Chem.SDMolSupplier(str(out), removeHs=False))
  assert len(back) == 50 and all(m is not None for m in back)
  for smiles, mol in zip(COMMON_SMILES, back):
    expected = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert mol.GetProp("_Name") == smiles and mol.GetProp("smiles") == smiles
    assert mol.GetProp("mode") == "refine" and mol.GetIntProp("sample") == 0
    assert np.isfinite(mol.GetDoubleProp("energy_eV"))
    np.testing.assert_array_equal(_adjacency(mol), _adjacency(expected), err_msg=smiles)
    assert Chem.MolToSmiles(Chem.RemoveHs(mol)) == Chem.MolToSmiles(Chem.MolFromSmiles(smiles))
    pos = mol.GetConformer().GetPositions()
    assert mol.GetConformer().Is3D() and np.isfinite(pos).all() and np.ptp(pos, axis=0).max() > 0.5
  energies = [s.energy for s in report.structures]
  np.testing.assert_allclose([m.GetDoubleProp("energy_eV") for m in back], energies, rtol=1e-12)


def test_bad_molecules_are_reported_and_the_rest_predicted_to_xyz(model, tmp_path):
  inputs = molecules.read_smiles(["CCO", "C1CC", "[U]", "C" * 30, "c1ccccc1", ""])
  out = tmp_path / "pred.xyz"
  report = run.predict_to_file(model, inputs, out, Sampling(mode="ddim", samples=2, steps=3, seed=4))
  reasons = {f.name: f.reason for f in report.failures}
  assert reasons == {"C1CC": molecules.REASON_PARSE, "[U]": molecules.REASON_ELEMENT,
                     "C" * 30: molecules.REASON_SIZE, "": molecules.REASON_PARSE}
  summary = report.summary()
  assert "predicted 2 of 6 molecules" in summary and "element(s) U not in the training data" in summary
  assert "92 atoms" in summary and "largest shape bucket" in summary

  frames = ase.io.read(out, index=":")
  assert [(a.info["name"], a.info["sample"]) for a in frames] == [("CCO", 0), ("CCO", 1),
                                                                  ("c1ccccc1", 0), ("c1ccccc1", 1)]
  for atoms, s in zip(frames, report.structures):
    assert atoms.get_potential_energy() == pytest.approx(s.energy, abs=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), s.forces, atol=1e-6)
    np.testing.assert_allclose(atoms.positions, s.positions, atol=1e-6)
  assert not np.allclose(frames[0].positions, frames[1].positions)  # two different samples
  overlapping = sum(run._min_distance(s.positions) < run.OVERLAP_DISTANCE for s in report.structures)  # pylint: disable=protected-access
  assert report.n_overlapping == overlapping
  assert ("closer than" in summary) == bool(overlapping)


def test_input_files_and_given_coordinates(model, tmp_path):
  start = {s: molecules.start_positions(molecules.from_smiles(s), "refine", 0) for s in ("CCO", "c1ccncc1")}
  sdf = tmp_path / "in.sdf"
  with Chem.SDWriter(str(sdf)) as w:
    for s, pos in start.items():
      mol = molecules.from_smiles(s).mol
      conf = Chem.Conformer(mol.GetNumAtoms())
      for i, p in enumerate(pos):
        conf.SetAtomPosition(i, p.tolist())
      mol.AddConformer(conf)
      mol.SetProp("_Name", f"mol-{s}")
      w.write(mol)
  xyz = tmp_path / "in.xyz"
  ase.io.write(xyz, [ase.Atoms(numbers=molecules.from_smiles(s).atomic_numbers, positions=p, info={"name": s})
                     for s, p in start.items()], format="extxyz")
  smi = tmp_path / "in.smi"
  smi.write_text("# name column optional\nCCO ethanol\n\nc1ccncc1\nnot_a_smiles bad\n")

  from_sdf, from_xyz, from_smi = (molecules.read_input(p) for p in (sdf, xyz, smi))
  assert [m.name for m in from_sdf] == ["mol-CCO", "mol-c1ccncc1"]
  assert [m.name for m in from_smi[:2]] == ["ethanol", "in.smi:4"]
  assert isinstance(from_smi[2], molecules.MoleculeError) and from_smi[2].name == "bad"
  for a, b in zip(from_sdf, from_xyz):  # bonds perceived from the xyz coordinates = the SDF's graph
    assert a.has_coordinates and b.has_coordinates
    assert Chem.MolToSmiles(a.mol) == Chem.MolToSmiles(b.mol)
    np.testing.assert_array_equal(_adjacency(a.mol), _adjacency(b.mol))
    np.testing.assert_allclose(molecules.start_positions(b, "refine", 0), start[b.name], atol=1e-6)

  # Refine with t_star small stays near the given structures (a start far away would show here).
  report = run.predict(model, from_xyz, Sampling(mode="refine", t_star=0.02, steps=2))
  for s in report.structures:
    assert np.abs(s.positions - start[s.molecule.name]).max() < 1.0
  with pytest.raises(molecules.InputFileError, match=r"in\.mol2.*unknown input format"):
    molecules.read_input(tmp_path / "in.mol2")
  with pytest.raises(molecules.InputFileError, match=r"missing\.sdf: no such file"):
    molecules.read_input(tmp_path / "missing.sdf")


def test_relax_lowers_the_learned_energy(model):
  inputs = molecules.read_smiles(["CCO", "CC(=O)N", "c1ccoc1"])
  sampling = Sampling(mode="refine", t_star=0.2, steps=3, seed=1)
  raw = run.predict(model, inputs, sampling)
  relaxed = run.predict(model, inputs, sampling, relax=True, fmax=0.05, relax_steps=60)
  for a, b in zip(raw.structures, relaxed.structures):
    assert b.relaxed and not a.relaxed
    assert b.energy < a.energy - 0.01 and b.max_force < a.max_force
  # A few steps on a 6-step model's surface do not all converge: those are counted and reported.
  assert relaxed.relax_unconverged == sum(s.max_force > 0.05 for s in relaxed.structures)
  if relaxed.relax_unconverged:
    assert "stopped before fmax" in relaxed.summary()


def test_output_path_and_checkpoint_errors(workdir, tmp_path):
  with pytest.raises(writers.OutputPathError, match=r"no_dir/x\.sdf: directory .* does not exist"):
    writers.check_output_path(tmp_path / "no_dir" / "x.sdf")
  with pytest.raises(writers.OutputPathError, match=r"unknown output format '\.pdb'"):
    writers.check_output_path(tmp_path / "x.pdb")
  (tmp_path / "file").write_text("")
  with pytest.raises(writers.OutputPathError, match="does not exist"):
    writers.check_output_path(tmp_path / "file" / "x.sdf")

  other = tmp_path / "other_config"
  shutil.copytree(workdir, other)
  for meta in other.glob("checkpoints/*/meta/metadata"):
    d = json.loads(meta.read_text())
    d["config"]["model"]["channels"] = 16
    meta.write_text(json.dumps(d))
  with pytest.raises(inference.CheckpointError, match=r"other_config.*incompatible checkpoint"):
    inference.load_model(other)
  with pytest.raises(inference.CheckpointError, match=r"not_a_run: no such directory"):
    inference.load_model(tmp_path / "not_a_run")
  with pytest.raises(inference.CheckpointError, match=r"no checkpoints"):
    inference.load_model(tmp_path)


def test_nothing_predicted_writes_nothing(model, tmp_path):
  out = tmp_path / "pred.sdf"
  out.write_text("previous")
  report = run.predict_to_file(model, molecules.read_smiles(["C1CC", "[U]"]), out, Sampling())
  assert not report.structures and out.read_text() == "previous"
  assert sorted(os.listdir(tmp_path)) == ["pred.sdf"]


def _cli(*args) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "launch.predict", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_flag_errors_name_the_flag(tmp_path):
  bad_out = _cli("--smiles", "CCO", "--out", str(tmp_path / "nope" / "x.sdf"))
  assert bad_out.returncode != 0 and "--out=" in bad_out.stderr and "does not exist" in bad_out.stderr
  no_model = _cli("--checkpoint", str(tmp_path / "missing"), "--smiles", "CCO",
                  "--out", str(tmp_path / "x.sdf"))
  assert no_model.returncode != 0 and "--checkpoint=" in no_model.stderr
  assert "no such directory" in no_model.stderr
  assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_end_to_end(workdir, tmp_path):
  ok = _cli("--checkpoint", str(workdir), "--smiles", "CCO", "--smiles", "C1CC", "--out", str(tmp_path / "x.sdf"),
            "--mode", "refine", "--samples", "2", "--relax")
  assert ok.returncode == 0, ok.stderr
  assert "predicted 1 of 2 molecules" in ok.stdout and "C1CC: unparsable input" in ok.stdout
  assert len(list(Chem.SDMolSupplier(str(tmp_path / "x.sdf")))) == 2
  none = _cli("--checkpoint", str(workdir), "--smiles", "[U]", "--out", str(tmp_path / "y.sdf"))
  assert none.returncode != 0 and "no molecule could be predicted" in none.stderr
  assert not (tmp_path / "y.sdf").exists()
