"""launch.predict on what a new user gives it: ions and radicals the model never saw are refused per
molecule, a bad frame of an XYZ file is skipped with its index, a molecule's structures do not
depend on its position in the input, and flag / input mistakes are named before the model loads."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest

from consist import checkpoint
from consist.inference import Sampling, TrainedModel
from consist.predict import molecules

REPO = Path(__file__).resolve().parents[1]


from predict_model import model, workdir  # noqa: E402,F401  (the shared smoke-model fixtures)


def _prepared(model, smiles, sampling):
  out = []
  for s in smiles:
    m = molecules.from_smiles(s)
    out.append((m, molecules.to_record(m, molecules.start_positions(m, sampling.mode, sampling.seed),
                                       model.fidelities[0])))
  return out


def test_ions_and_radicals_outside_the_training_data_are_refused(model, workdir, tmp_path):
  with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
    assert ckpt.meta(ckpt.latest_step())["coverage"] == {"charges": [0], "multiplicities": [1]}
  inputs = molecules.read_smiles(["[NH4+]", "[CH3]", "CCO", "CC(=O)[O-]"])
  fidelity = model.fidelities[0]
  refused = {}
  for m in inputs:
    try:
      molecules.check_supported(model, m, fidelity)
    except molecules.MoleculeError as e:
      refused[e.name] = (e.reason, e.detail)
  assert sorted(refused) == ["CC(=O)[O-]", "[CH3]", "[NH4+]"]
  assert all(reason == molecules.REASON_CHARGE for reason, _ in refused.values())
  assert "multiplicity 2 (a radical)" in refused["[CH3]"][1] and "charges [0]" in refused["[CH3]"][1]
  assert "charge +1" in refused["[NH4+]"][1]

  # A checkpoint written before coverage was recorded: neutral closed-shell only.
  old = tmp_path / "old_run"
  shutil.copytree(workdir, old)
  for meta in old.glob("checkpoints/*/meta/metadata"):
    d = json.loads(meta.read_text())
    d.pop("coverage")
    meta.write_text(json.dumps(d))
  old_model = TrainedModel.load(old)
  assert molecules.training_coverage(old_model) == molecules.DEFAULT_COVERAGE
  with pytest.raises(molecules.MoleculeError, match="charge or multiplicity"):
    molecules.check_supported(old_model, molecules.from_smiles("[CH3]"), fidelity)
  molecules.check_supported(old_model, molecules.from_smiles("CCO"), fidelity)


def test_xyz_frame_with_unknown_element_is_skipped_not_the_file(tmp_path):
  frames = [ase.Atoms("OH2", positions=[[0, 0, 0.12], [0, 0.76, -0.47], [0, -0.76, -0.47]]),
            ase.Atoms("CH4", positions=[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                                        [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])]
  good = tmp_path / "good.xyz"
  ase.io.write(good, frames, format="extxyz")
  lines = good.read_text().splitlines(keepends=True)
  bad_frame = "".join(lines[:5]).replace("\nO ", "\nXx ", 1)
  mixed = tmp_path / "mixed.xyz"
  mixed.write_text("".join(lines[:5]) + bad_frame + "".join(lines[5:]))
  out = molecules.read_input(mixed)
  assert [type(m).__name__ for m in out] == ["Molecule", "MoleculeError", "Molecule"]
  assert out[1].name == "mixed.xyz:2" and out[1].reason == molecules.REASON_PARSE
  assert "frame 2" in out[1].detail and "Xx" in out[1].detail
  assert out[2].atomic_numbers.tolist() == [6, 1, 1, 1, 1]

  binary = tmp_path / "blob.xyz"
  binary.write_bytes(bytes(range(256)) * 8)
  with pytest.raises(molecules.InputFileError, match=r"blob\.xyz: not a text \.xyz file"):
    molecules.read_input(binary)
  folder = tmp_path / "dir.smi"
  folder.mkdir()
  with pytest.raises(molecules.InputFileError, match=r"dir\.smi: is a directory"):
    molecules.read_input(folder)


def test_a_molecule_s_structures_do_not_depend_on_its_position(model):
  sampling = Sampling(mode="ddim", steps=2, seed=3)
  alone = molecules.sample_per_molecule(model, _prepared(model, ["CCO"], sampling), sampling)
  mixed = molecules.sample_per_molecule(model, _prepared(model, ["c1ccccc1", "CCO", "CC", "CCO"], sampling),
                                        sampling)
  np.testing.assert_array_equal(mixed[1], alone[0])
  np.testing.assert_array_equal(mixed[3], alone[0])
  other_seed = molecules.sample_per_molecule(model, _prepared(model, ["CCO"], sampling),
                                             Sampling(mode="ddim", steps=2, seed=4))
  assert not np.allclose(other_seed[0], alone[0])
  # ETKDG starts are seeded by the canonical SMILES: "OCC" is ethanol too.
  assert molecules.from_smiles("OCC").seed(0) == molecules.from_smiles("CCO").seed(0)


def test_too_large_molecule_message_gives_the_practical_limit(model):
  assert model.config.data.cutoff is None
  with pytest.raises(molecules.MoleculeError) as e:
    molecules.check_supported(model, molecules.from_smiles("C" * 30), model.fidelities[0])
  top = model.buckets.largest
  limit = molecules.max_atoms_all_pairs(top.n_node - 1, top.n_edge)
  assert limit * (limit - 1) <= top.n_edge < (limit + 1) * limit or limit == top.n_node - 1
  assert "all n(n-1) atom pairs" in e.value.detail and f"about {limit} atoms" in e.value.detail


def _cli(*args) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "launch.predict", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_empty_input_and_flag_errors_before_loading_the_model(tmp_path):
  empty = tmp_path / "empty.smi"
  empty.write_text("# nothing here\n\n")
  missing_model = ["--checkpoint", str(tmp_path / "no_model"), "--out", str(tmp_path / "x.sdf")]
  out = _cli("--input", str(empty), *missing_model)
  assert out.returncode != 0 and "nothing to predict" in out.stderr and "no_model" not in out.stderr
  out = _cli("--smiles", "CCO", "--t_star", "2", *missing_model)
  assert out.returncode == 2 and "--t_star=2.0: must lie in (0, 1]" in out.stderr
  assert "t_start" not in out.stderr and "Traceback" not in out.stderr
  out = _cli("--smiles", "CCO", "--mode", "ddim", "--eta", "1.5", *missing_model)
  assert out.returncode == 2 and "--eta=1.5: must lie in [0, 1]" in out.stderr
  assert "Traceback" not in out.stderr
  out = _cli("--smiles", "CCO", "--mode", "ddim", "--noise_scale", "-1", *missing_model)
  assert out.returncode == 2 and "--noise_scale=-1.0: must lie in [0, 1]" in out.stderr
  out = _cli("--smiles", "CCO", "--candidates", "4", *missing_model)  # refine is deterministic
  assert out.returncode == 2 and "--candidates=4: refine is deterministic" in out.stderr
  assert "Traceback" not in out.stderr
  assert not list(tmp_path.glob("x.sdf"))


def test_cli_structure_level_the_model_lacks_is_a_one_line_error(tmp_path):
  out = _cli("--smiles", "CCO", "--structure_level", "5", "--out", str(tmp_path / "x.sdf"))
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "--structure_level=5: structure level 5: this model has structure levels 0..1" in out.stderr
  assert not list(tmp_path.glob("x.sdf"))
