"""consist.eval.run / launch.evaluate on the smoke dataset and a smoke-trained run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from consist.data.bundled import SMOKE_DATASET
from consist.eval import physics, run, structure
from consist.inference import Sampling
from consist.reproduce import load_config
from consist.train import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
SETTINGS = run.EvalSettings(workers=0, max_molecules=4)
STRUCTURE = [f"{m}_{s}" for m in structure.STRUCTURE_METRICS for s in ("mean", "min")]
ACCURATE = [f"{m}_{s}" for m in physics.ACCURATE_METRICS for s in ("mean", "min")] + ["broken_frac", "valid_frac"]


def kabsch_rmsd(p, q):
  """Independent all-atom RMSD after the optimal proper rotation (Kabsch, via the 3x3 SVD)."""
  p, q = p - p.mean(axis=0), q - q.mean(axis=0)
  u, _, vt = np.linalg.svd(p.T @ q)
  d = np.sign(np.linalg.det(vt.T @ u.T))
  rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
  return float(np.sqrt(np.mean(np.sum((p @ rot.T - q) ** 2, axis=1))))


@pytest.fixture(scope="module")
def records():
  return run.evaluation_records(run.open_split(SMOKE_DATASET, "test"), where="smoke test",
                                max_molecules=SETTINGS.max_molecules)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A smoke run trained for a few steps (the evaluation needs a checkpoint, not a good model)."""
  c = load_config(REPO / "configs" / "smoke.py")
  c.train.update(steps=4, ckpt_every=4, eval_every=0, log_every=2)
  workdir = tmp_path_factory.mktemp("smoke_run")
  train_and_evaluate(c, workdir)
  return workdir


def test_evaluation_records_are_the_equilibrium_records_with_minima(records):
  store = run.open_split(SMOKE_DATASET, "test")
  every = run.evaluation_records(store, where="smoke test")
  assert len({r.mol_id for r in every}) == len(every) == len(set(store.mol_ids()))
  assert all(r.is_equilibrium and r.ref_positions is not None for r in every)
  assert [r.mol_id for r in records] == [every[i].mol_id for i in (0, 5, 10, 15)]  # evenly spaced
  with pytest.raises(run.EvaluationError, match=r"smoke train: no equilibrium record with a reference"):
    run.evaluation_records(run.open_split(SMOKE_DATASET, "train"), where="smoke train")


def test_cheap_baseline_against_independent_values(records):
  ev = run.evaluate_baseline(records, "cheap", SETTINGS, show_progress=False)
  assert not ev.failures
  for i, r in enumerate(records):
    pos, ref = np.asarray(r.positions, np.float64), np.asarray(r.ref_positions, np.float64)
    assert ev.metrics["rmsd_mean"][i] == pytest.approx(kabsch_rmsd(pos, ref), rel=1e-6)
    assert ev.metrics["rmsd_sym_mean"][i] <= ev.metrics["rmsd_mean"][i] + 1e-12
    # The dataset's own GFN2-xTB labels at the cheap structure and at the minimum.
    assert ev.metrics["energy_gap_mean"][i] == pytest.approx(r.energy - r.ref_energy, abs=1e-4)
    assert ev.metrics["energy_gap_mean"][i] > 0  # the cheap structure lies above the accurate minimum
    assert ev.metrics["force_rms_mean"][i] == pytest.approx(np.sqrt(np.mean(r.forces ** 2)), rel=1e-3)
    assert ev.metrics["broken_frac"][i] == 0.0


def test_broken_structures_skip_the_accurate_level(records):
  r = records[0]
  pos = np.asarray(r.positions, np.float64)
  far = pos.copy()
  far[r.bonds[0][1]] += 5.0  # a bond stretched to > 3 Å
  close = pos.copy()
  close[1] = close[0] + 0.2  # two atoms 0.2 * sqrt(3) = 0.35 Å apart
  np.testing.assert_array_equal(run.geometry_broken(np.stack([pos, far, close]), r.bonds), [False, True, True])
  ev = run.score_predictions([r], [np.stack([pos, far])], SETTINGS, show_progress=False)
  assert ev.metrics["broken_frac"] == [0.5]
  assert ev.metrics["energy_gap_mean"][0] == pytest.approx(r.energy - r.ref_energy, abs=1e-4)  # the intact one
  assert ev.metrics["rmsd_mean"][0] > ev.metrics["rmsd_min"][0]  # structure metrics see both samples
  ev = run.score_predictions([r], [far[None]], SETTINGS, show_progress=False)
  assert math.isnan(ev.metrics["energy_gap_mean"][0]) and "broken" in ev.failures[r.mol_id][0]


def test_etkdg_baseline_keeps_atom_order_and_is_seeded(records):
  preds, failures = run.baseline_predictions(records, "etkdg", seed=3)
  assert not failures
  again, _ = run.baseline_predictions(records[:1], "etkdg", seed=3)
  np.testing.assert_array_equal(again[0], preds[0])
  for r, p in zip(records, preds):
    assert p.shape == (1, r.n_atoms, 3) and np.isfinite(p).all()
    # Bonded atoms of the record are bonded in the embedding (a permuted order breaks this) ...
    assert structure.bond_length_mae(p, r.ref_positions, r.bonds)[0] < 0.08
    # ... but the geometry is the unrelaxed embedding, not the cheap minimum.
    assert kabsch_rmsd(p[0], np.asarray(r.positions, np.float64)) > 0.01


def test_evaluate_trained_run_reports_every_metric(trained, records):
  result = run.evaluate(trained, SMOKE_DATASET, "test", Sampling(mode="refine", samples=2, steps=2),
                        SETTINGS, show_progress=False)
  json.dumps(result, allow_nan=False)
  m = len(records)
  assert result["mol_ids"] == [r.mol_id for r in records] and result["model"]["step"] == 4
  model = result["model"]["metrics"]
  assert set(model) == set(STRUCTURE + ACCURATE + list(run.MODEL_METRICS))
  assert all(len(v) == m for v in model.values())
  assert all(x is not None for x in model["rmsd_mean"] + model["egap_phi_mean"] + model["model_force_rmse"])
  for name in ("cheap", "etkdg"):
    metrics = result["baselines"][name]["metrics"]
    assert set(metrics) == set(model)
    for metric in STRUCTURE + ACCURATE + ["egap_phi_mean", "e_phi_ref"]:
      assert all(x is not None and math.isfinite(x) for x in metrics[metric]), (name, metric)
    assert result["baselines"][name]["summary"]["rmsd_mean"]["n"] == m
  # Relaxed on the learned energy: lower model energy than the cheap start, its time, and every
  # molecule stopped at the step limit listed.
  relaxed = result["baselines"]["relax"]
  assert set(relaxed["metrics"]) == set(model) | {"relax_steps", "relax_fmax", "relax_converged"}
  assert relaxed["seconds"] > 0 and relaxed["molecules_per_s"] > 0
  for i, r in enumerate(records):
    assert relaxed["metrics"]["relax_converged"][i] == 1.0 or r.mol_id in relaxed["failures"]
    e_cheap = result["baselines"]["cheap"]["metrics"]["e_phi_pred_mean"][i]
    assert relaxed["metrics"]["e_phi_pred_mean"][i] <= e_cheap + 1e-4
  cheap = result["baselines"]["cheap"]["metrics"]
  for i, r in enumerate(records):
    assert cheap["rmsd_mean"][i] == pytest.approx(
        kabsch_rmsd(np.asarray(r.positions, np.float64), np.asarray(r.ref_positions, np.float64)), rel=1e-6)
  # The energy-head force diagnostic: the accurate side is the records' own force labels.
  diag = result["force_diagnostic"]
  forces = np.concatenate([r.forces for r in records])
  assert diag["n_molecules"] == m and diag["rms_accurate"] == pytest.approx(np.sqrt(np.mean(forces ** 2)), rel=1e-5)
  assert model["model_force_rmse"][0] == pytest.approx(diag["per_molecule"]["rmse"][0], rel=1e-5)


def test_bad_input_names_workdir_data_and_split(trained, tmp_path):
  sampling = Sampling(mode="refine")
  with pytest.raises(run.EvaluationError, match=r"--data .*missing: cannot open"):
    run.evaluate(trained, tmp_path / "missing", "test", sampling, SETTINGS)
  with pytest.raises(run.EvaluationError, match=r"no split 'tset' \(splits: \['test', 'train', 'val'\]\)"):
    run.evaluate(trained, SMOKE_DATASET, "tset", sampling, SETTINGS)
  with pytest.raises(run.EvaluationError, match=r"--split train: no equilibrium record with a reference"):
    run.evaluate(trained, SMOKE_DATASET, "train", sampling, SETTINGS)
  with pytest.raises(run.EvaluationError, match=rf"--workdir {tmp_path}: cannot load a trained model"):
    run.evaluate(tmp_path, SMOKE_DATASET, "test", sampling, SETTINGS)


@pytest.mark.slow
def test_launch_evaluate_cli(trained, tmp_path):
  out = tmp_path / "results.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  base = [sys.executable, "-m", "launch.evaluate", "--data", str(SMOKE_DATASET), "--split", "test",
          "--mode", "ddim", "--samples", "1", "--steps", "2", "--max_molecules", "2", "--workers", "1"]
  proc = subprocess.run(base + ["--workdir", str(trained), "--out", str(out)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert len(result["mol_ids"]) == 2 and result["model"]["sampling"]["mode"] == "ddim"
  assert result["meta"]["command"].startswith("python -m launch.evaluate --data")
  assert "rmsd_sym_mean" in proc.stdout and "energy-head force RMSE" in proc.stdout
  proc = subprocess.run(base + ["--workdir", str(tmp_path / "nowhere"), "--out", str(out)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1 and f"--workdir {tmp_path / 'nowhere'}: cannot load" in proc.stderr
  proc = subprocess.run(base + ["--workdir", str(trained), "--level", "0", "--out", str(out)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "level: unknown level of theory '0'" in proc.stderr.strip().splitlines()[-1]
