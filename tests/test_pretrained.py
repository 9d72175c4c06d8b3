"""The bundled pretrained model (models/pretrained, configs/pretrained.py): it is the default of
`launch.predict` and the calculator, it is actually trained, and it works through both."""

import os
import subprocess
import sys
from pathlib import Path

import ase.optimize
import numpy as np
import pytest
from rdkit import Chem

from consist import inference
from consist.calculator import ConsistCalculator
from consist.data.bundled import BUNDLED_DATASET, PRETRAINED_MODEL, STRUCTURE_STAGE1
from consist.data.store import open_dataset
from consist.predict import molecules
from test_predict import COMMON_SMILES  # pylint: disable=wrong-import-order

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
  return inference.load_model()  # None: the bundled model


def test_default_is_the_bundled_model_and_it_is_trained(model):
  assert model.workdir == PRETRAINED_MODEL and model.config.train.steps == model.step
  # Energy-head forces at the test split's MMFF94 structures against the GFN2-xTB labels: a trained
  # model explains a good part of them (an untrained one: error ~ label RMS).
  test = open_dataset(BUNDLED_DATASET)["test"]
  records = [test[i] for i in range(0, len(test), max(1, len(test) // 24))][:24]
  errors, labels = [], []
  for r, (_, forces) in zip(records, model.energy_and_forces(records)):
    errors.append(forces - r.forces)
    labels.append(r.forces)
  rmse = np.sqrt(np.mean(np.concatenate(errors) ** 2))
  rms = np.sqrt(np.mean(np.concatenate(labels) ** 2))
  assert rmse < 0.8 * rms, (rmse, rms)


def test_refine_asks_for_the_level_each_bundled_model_was_trained_for(model):
  """models/pretrained had consistency move its accurate level: refine asks for level 1 at the
  consistency t*; the stage-1 model (denoising only) has level 1 untrained, so refine asks for
  level 0 at its own t*; explicit settings win."""
  stage1 = inference.load_model(STRUCTURE_STAGE1)
  refine = inference.Sampling(mode="refine")
  assert model.trained_level == 1 and stage1.trained_level == 0
  resolved = model.resolve(refine)
  assert (resolved.level, resolved.t_star) == (1, model.config.loss.optimality_t_range[0]) == (1, 0.02)
  resolved = stage1.resolve(refine)
  assert (resolved.level, resolved.t_star) == (0, inference.LEVEL0_T_STAR)
  resolved = model.resolve(inference.Sampling(mode="refine", level=0, t_star=0.05))
  assert (resolved.level, resolved.t_star) == (0, 0.05)


def test_stage2_configs_fit_the_bundled_stage1_and_pretrained_models(model):
  """The stage-2 arms of the reproduction and the demo start from models/structure_stage1: their
  model config (configs/pretrained.py) must be the one stored with it, but for the level
  increments stage 2 adds (zero at its start), and the one of models/pretrained."""
  import dataclasses
  from consist.config import Config
  from consist.reproduce import load_config

  def architecture(m):  # without the energy model's data statistics, which training fills in
    return dataclasses.replace(m, energy=dataclasses.replace(m.energy, avg_num_neighbors=0.0, scale=0.0, shift=0.0))

  stage1 = architecture(inference.load_model(STRUCTURE_STAGE1).config.model)
  for name in ("reproduce_pretrained.py", "demo.py"):
    stage2 = architecture(Config.from_config_dict(load_config(REPO / "configs" / name).stage2).model)
    assert stage2 == architecture(model.config.model), name
    assert dataclasses.replace(stage2, level_params=stage1.level_params) == stage1, name


def test_missing_bundled_model_says_how_to_make_it(monkeypatch, tmp_path):
  monkeypatch.setattr(inference, "PRETRAINED_MODEL", tmp_path / "pretrained")
  with pytest.raises(inference.CheckpointError,
                     match=r"bundled pretrained model is not in this checkout.*configs/pretrained.py"):
    inference.load_model()


def test_calculator_defaults_to_it_and_relaxes(model):
  mol = molecules.from_smiles("CCO")
  atoms = ase.Atoms(numbers=mol.atomic_numbers, positions=molecules.start_positions(mol, "refine", 0))
  atoms.calc = ConsistCalculator.from_workdir()
  assert atoms.calc.model.workdir == PRETRAINED_MODEL
  e0 = atoms.get_potential_energy()
  assert ase.optimize.BFGS(atoms, logfile=None).run(fmax=0.05, steps=300)
  assert atoms.get_potential_energy() <= e0


@pytest.mark.slow
def test_predict_cli_default_model_on_50_smiles(tmp_path):
  out = tmp_path / "pred.sdf"
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  args = [a for s in COMMON_SMILES for a in ("--smiles", s)]
  done = subprocess.run([sys.executable, "-m", "launch.predict", *args, "--out", str(out)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert "predicted 50 of 50 molecules" in done.stdout
  back = list(Chem.SDMolSupplier(str(out), removeHs=False))
  assert len(back) == 50
  for smiles, mol in zip(COMMON_SMILES, back):
    expected = Chem.AddHs(Chem.MolFromSmiles(smiles))
    np.testing.assert_array_equal(Chem.GetAdjacencyMatrix(mol, useBO=True),
                                  Chem.GetAdjacencyMatrix(expected, useBO=True), err_msg=smiles)


def test_refine_with_the_default_settings_does_no_harm(model):
  """Issue 13: refine (launch.predict's defaults) started from the test split's MMFF94 structures
  gives structures at least as close to the GFN2-xTB minima, bonds closer, none broken."""
  from consist.eval import run as eval_run, structure  # pylint: disable=import-outside-toplevel
  records = eval_run.evaluation_records(open_dataset(BUNDLED_DATASET)["test"], where="test",
                                        max_molecules=40)
  refined = model.sample(records, inference.Sampling(mode="refine"))
  rmsd, bond = {"in": [], "out": []}, {"in": [], "out": []}
  for r, pred in zip(records, refined):
    for key, positions in (("in", r.positions[None]), ("out", pred)):
      m = structure.molecule_structure_metrics(r.atomic_numbers, r.bonds, positions, r.ref_positions)
      rmsd[key].append(m["rmsd_sym_mean"])
      bond[key].append(m["bond_mae_mean"])
    assert structure.connectivity_valid(r.atomic_numbers, r.bonds, pred).all(), r.mol_id
  assert np.mean(rmsd["out"]) <= np.mean(rmsd["in"]), (np.mean(rmsd["out"]), np.mean(rmsd["in"]))
  assert np.mean(bond["out"]) < 0.8 * np.mean(bond["in"]), (np.mean(bond["out"]), np.mean(bond["in"]))


def test_ddim_at_the_accurate_level_samples_level_0_then_refines(model):
  """Level 1 was trained only at the consistency t*: de novo asked for it runs the trajectory at
  level 0 and refines that sample at level 1, exactly as refine mode would from it."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  test = open_dataset(BUNDLED_DATASET)["test"]
  records = [test[i] for i in (0, 5, 9)]
  ddim = inference.Sampling(mode="ddim", steps=4, candidates=1)
  level0 = model.sample(records, dataclasses.replace(ddim, level=0))
  handed = model.sample(records, ddim)
  refined = model.sample([dataclasses.replace(r, positions=x[0]) for r, x in zip(records, level0)],
                         inference.Sampling(mode="refine"))
  for a, b, x0 in zip(handed, refined, level0):
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(a - x0).max() > 1e-3  # level 1 moved it


def test_each_consensus_structure_is_the_medoid_of_its_own_candidates(model):
  """candidates=C draws the same C structures as samples=C (the same keys) and returns their medoid."""
  from consist import consensus  # pylint: disable=import-outside-toplevel
  test = open_dataset(BUNDLED_DATASET)["test"]
  records = [test[i] for i in (1, 7)]
  drawn = model.sample(records, inference.Sampling(mode="ddim", steps=4, samples=4, candidates=1, seed=3))
  chosen = model.sample(records, inference.Sampling(mode="ddim", steps=4, candidates=4, seed=3))
  for r, x, c in zip(records, drawn, chosen):
    assert c.shape == (1, *x.shape[1:])
    np.testing.assert_allclose(c[0], x[consensus.medoid_index(r.atomic_numbers, r.bonds, x, r.charge)],
                               atol=1e-6)
