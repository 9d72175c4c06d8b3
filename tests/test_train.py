"""train_and_evaluate end to end on a small synthetic dataset; bad input fails before any step."""

import dataclasses
import importlib.util
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import train_toy
from consist import checkpoint, inference
from consist.config import Config, ConfigError
from consist.data.bundled import SMOKE_DATASET
from consist.train import DatasetLabelError, NonFiniteError, train_and_evaluate

REPO = Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return train_toy.write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic")


def smoke(dataset, arg=None, **train):
  c = load_config("smoke", arg)
  c.data.path = dataset
  c.train.update(train)
  return c


def _lines(workdir):
  path = Path(workdir) / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def test_pretrained_and_energy_configs_train_the_two_models_apart():
  energy = Config.from_config_dict(load_config("energy"))
  assert energy.loss.denoise_weight == 0 and energy.loss.energy_weight > 0 and energy.loss.forces_weight > 0
  first = Config.from_config_dict(load_config("pretrained"))
  assert first.model.energy == energy.model.energy and first.loss == energy.loss
  second = Config.from_config_dict(load_config("pretrained", "structure"))
  assert second.train.init_mode == "energy_model" and second.model.energy == energy.model.energy
  assert second.loss.energy_weight == 0 and second.loss.forces_weight == 0 and second.loss.denoise_weight > 0
  assert not second.loss.has_consistency and second.data.cutoff is None
  assert second.model.trunk == "separate"  # so run 2 cannot change run 1's energy model
  third = Config.from_config_dict(load_config("pretrained", "consistency"))
  assert third.train.stage == 2 and third.loss.has_consistency and third.loss.consistency_level == 1
  # The same structure model, plus level 1's own increment (only it receives consistency gradients).
  assert third.model.level_params == "increment" and third.loss.consistency_params == "level_increment"
  assert dataclasses.replace(third.model, level_params=second.model.level_params) == second.model
  assert third.loss.energy_weight == third.loss.forces_weight == 0


@pytest.mark.parametrize("name", ["smoke", "quickstart", "default", "pm6"])
def test_configs_build(name):
  for arg in (None, "stage2", "baseline"):
    cfg = Config.from_config_dict(load_config(name, arg))
    assert cfg.train.stage == (1 if arg is None else 2)
    if arg == "baseline":
      assert cfg.loss.optimality_weight == 0 and cfg.loss.score_weight == 0
    if arg == "stage2":
      assert cfg.loss.optimality_weight > 0 or cfg.loss.score_weight > 0


def test_unknown_or_bad_config_key_is_named():
  c = load_config("smoke")
  with pytest.raises(ConfigError, match=r"unknown config key 'optim\.learnig_rate'"):
    Config.from_config_dict({**c.to_dict(), "optim": {"learnig_rate": 1e-3}})
  with pytest.raises(ConfigError, match=r"unknown config key 'model\.chanels'"):
    Config.from_config_dict({**c.to_dict(), "model": {"chanels": 8}})
  with pytest.raises(ConfigError, match=r"train\.on_nonfinite: must be 'stop' or 'skip'"):
    Config.from_config_dict({**c.to_dict(), "train": {"on_nonfinite": "ignore"}})
  with pytest.raises(ConfigError, match=r"train\.init_from: only a stage-2 run"):
    Config.from_config_dict({**c.to_dict(), "train": {"init_from": "/x"}})
  with pytest.raises(ConfigError, match=r"data\.graphs_per_device: expected an integer"):
    Config.from_config_dict({**c.to_dict(), "data": {"path": "x", "graphs_per_device": 2.5}})


def test_missing_label_fails_before_any_step(tmp_path):
  data = train_toy.write_synthetic_dataset(tmp_path / "no_forces", per_molecule=1, forces=False)
  with pytest.raises(DatasetLabelError, match=r"split 'train' has no 'forces' labels.*loss\.forces_weight"):
    train_and_evaluate(smoke(data), tmp_path / "run")
  assert not _lines(tmp_path / "run")


def test_budget_below_largest_molecule_names_it(dataset, tmp_path):
  c = smoke(dataset)
  c.data.max_nodes = 8  # ethanol (CCO) has 9 atoms
  with pytest.raises(ValueError, match=r"molecule \d+, mol_id='synthetic-\d+' with \d+ atoms.*does not fit"):
    train_and_evaluate(c, tmp_path / "run")
  assert not _lines(tmp_path / "run")


def test_missing_split_is_named(dataset, tmp_path):
  c = smoke(dataset)
  c.data.val_split = "valid"
  with pytest.raises(ConfigError, match=r"no split 'valid'"):
    train_and_evaluate(c, tmp_path / "run")


@pytest.fixture(scope="module")
def smoke_data(dataset):
  """The smoke dataset (data/smoke) once it is built, else the synthetic one."""
  return str(SMOKE_DATASET) if (SMOKE_DATASET / "dataset.json").exists() else dataset


@pytest.fixture(scope="module")
def smoke_run(smoke_data, tmp_path_factory):
  """The smoke config trained once (20 steps): (workdir, summary). Its wall time is a benchmark
  figure (`summary["wall_s"]`, `launch.bench --only train`), not asserted in a shared-machine test."""
  workdir = tmp_path_factory.mktemp("smoke") / "run"
  return workdir, train_and_evaluate(smoke(smoke_data), workdir)


def test_smoke_config_trains(smoke_run):
  workdir, out = smoke_run
  assert out["step"] == 20 and not out["preempted"] and out["compiles"] == out["buckets"] == 1
  train = [l for l in _lines(workdir) if l["split"] == "train"]
  val = [l for l in _lines(workdir) if l["split"] == "val"]
  assert [l["step"] for l in train] == [5, 10, 15, 20] and [l["step"] for l in val] == [10, 20]
  for key in ("energy_mse", "forces_mse", "denoise_mse", "grad_norm", "lr"):
    assert key in train[-1] and math.isfinite(train[-1][key])
  assert "optimality_stationarity" not in train[-1]  # stage 1: consistency off
  assert list((workdir / "tb").glob("events.out.tfevents.*"))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]


@pytest.mark.slow
def test_resume_and_reject_other_model(smoke_data, smoke_run, tmp_path):
  """Rerun with more steps resumes at 20; a different model in the same workdir is rejected before
  any step, naming the checkpoint path and the parameter."""
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir)
  out = train_and_evaluate(smoke(smoke_data, steps=24, log_every=2), workdir)
  assert out["step"] == 24
  assert [l["step"] for l in _lines(workdir) if l["split"] == "train"][-3:] == [20, 22, 24]

  other = smoke(smoke_data, steps=30)
  other.model.channels = 12
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=rf"{workdir / 'checkpoints' / '24'}: incompatible checkpoint: parameter "
                           rf"'encoder/.*' has shape"):
    train_and_evaluate(other, workdir)
  assert max(l["step"] for l in _lines(workdir)) == 24


@pytest.mark.slow
def test_stage2_from_stage1_and_baseline(dataset, tmp_path):
  """Stage 2 starts from the stage-1 params and adds the consistency terms; the baseline does not."""
  train_and_evaluate(smoke(dataset, steps=4, eval_every=0), tmp_path / "s1")
  with checkpoint.Checkpointer(tmp_path / "s1", read_only=True) as ckpt:
    stage1_meta = ckpt.meta(ckpt.latest_step())
  for arg, consistency in (("stage2", True), ("baseline", False)):
    c = smoke(dataset, arg, steps=2, log_every=1, eval_every=0, init_from=str(tmp_path / "s1"))
    c.data.reference_records = 3  # a refit on 3 records would differ: the stage-1 reference must be kept
    train_and_evaluate(c, tmp_path / arg)
    first = _lines(tmp_path / arg)[0]
    assert ("optimality_stationarity" in first) == consistency and ("score_consistency" in first) == consistency
    with checkpoint.Checkpointer(tmp_path / arg, read_only=True) as ckpt:
      meta = ckpt.meta(ckpt.latest_step())
    assert meta["init_from"] == {"workdir": str((tmp_path / "s1").resolve()), "step": 4, "mode": "params"}
    assert meta["energy_reference"] == stage1_meta["energy_reference"]


@pytest.mark.slow
def test_level_increments_start_at_zero_from_stage1_and_leave_level0_to_denoising(dataset, tmp_path):
  """A stage 2 with level increments starts from a stage 1 without (increments at 0); consistency
  routed to them moves level 1 only: the shared parameters end bitwise where the same run without
  consistency (the multi-task arm) ends them."""
  stage1 = smoke(dataset, steps=3, eval_every=0)
  stage1.model.update(prediction="edm", structure_levels=2)
  stage1.loss.denoise_weighting = "edm"
  train_and_evaluate(stage1, tmp_path / "s1")
  for arm, weight in (("consistency", 1.0), ("multitask", 0.0)):
    c = smoke(dataset, "stage2", steps=2, eval_every=0, init_from=str(tmp_path / "s1"))
    c.model.update(prediction="edm", structure_levels=2, level_params="increment")
    c.loss.update(denoise_weighting="edm", optimality_weight=weight, score_weight=0.0,
                  optimality_form="descent", optimality_noise=False, optimality_t_range=(0.02, 0.02),
                  consistency_level=1, consistency_params="level_increment")
    train_and_evaluate(c, tmp_path / arm)
  runs = {arm: inference.load_model(tmp_path / arm) for arm in ("consistency", "multitask")}
  assert runs["consistency"].trained_level == 1 and runs["multitask"].trained_level == 0
  for name in ("energy_model", "encoder", "structure_head"):
    for a, b in zip(jax.tree.leaves(runs["consistency"].params[name]), jax.tree.leaves(runs["multitask"].params[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.slow
def test_structure_model_on_another_runs_energy_model(dataset, tmp_path):
  """init_mode "energy_model": the energy model's parameters come from the other run (bitwise),
  the structure model, here of another architecture, starts fresh."""
  train_and_evaluate(smoke(dataset, steps=2, eval_every=0), tmp_path / "energy")
  c = smoke(dataset, steps=2, eval_every=0, init_from=str(tmp_path / "energy"),
            init_mode="energy_model")
  c.model.update(prediction="edm", structure_levels=2, channels=12)
  c.loss.update(energy_weight=0.0, forces_weight=0.0, denoise_weighting="edm")
  train_and_evaluate(c, tmp_path / "structure")
  params = {run: inference.load_model(tmp_path / run).params for run in ("energy", "structure")}
  for a, b in zip(jax.tree.leaves(params["energy"]["energy_model"]),
                  jax.tree.leaves(params["structure"]["energy_model"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert params["structure"]["encoder"]["atom_embedding"]["embedding"].shape[-1] == 12
  bad = smoke(dataset, steps=2, eval_every=0, init_from=str(tmp_path / "energy"),
              init_mode="energy_model")
  bad.model.energy.channels = 4
  with pytest.raises(checkpoint.CheckpointMismatchError, match="parameter 'energy_model/"):
    train_and_evaluate(bad, tmp_path / "bad")


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_step_and_term_or_is_skipped(tmp_path):
  """A 1e9 eV label (the largest a store accepts: a 1e25 one is refused on read) under energy
  weight 1e25: the weighted float32 loss overflows in the steps whose batch holds it, while each
  term stays finite, so the step names the loss."""
  data = train_toy.write_synthetic_dataset(tmp_path / "outlier", energy_outlier=20)
  c = smoke(data, steps=12, log_every=1, eval_every=0, ckpt_every=100)
  c.data.reference_records = 10  # records 0, 4, 9, 13, 18, 22, ... : the outlier stays an outlier
  c.loss.energy_weight = 1e25  # (1e9 eV / 9 atoms)^2 * 1e25 > float32 max; ~1 eV^2 * 1e25 is not
  with pytest.raises(NonFiniteError, match=r"step \d+: non-finite 'loss'"):
    train_and_evaluate(c, tmp_path / "stop")
  c.train.on_nonfinite = "skip"
  out = train_and_evaluate(c, tmp_path / "skip")
  assert 1 <= out["nonfinite_steps"] < 12 and out["step"] == 12
  finite = [math.isfinite(l["loss"]) for l in _lines(tmp_path / "skip")]
  assert sum(not f for f in finite) == out["nonfinite_steps"]
  first_bad = finite.index(False)
  assert any(finite[first_bad:]), "steps after a skipped one must train on (params stayed finite)"
