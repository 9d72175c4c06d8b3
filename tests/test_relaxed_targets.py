"""The minima of a run's learned energy as stage-2 targets: the dataset writer, the "relaxed"
optimality form's training-data checks, and a stage-2 run on them."""

import functools
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from consist import relax  # noqa: E402
from consist.data.bundled import SMOKE_DATASET  # noqa: E402
from consist.data.store import open_dataset  # noqa: E402
from consist.losses.optimality import RELAXED_TAG  # noqa: E402
from consist.relaxed_targets import write_relaxed_targets  # noqa: E402
from consist.train import DatasetLabelError, train_and_evaluate  # noqa: E402
from predict_model import model, smoke_config, workdir  # noqa: E402,F401  (the shared smoke-model fixtures)


def _tree_digest(path: Path) -> str:
  digest = hashlib.sha256()
  for f in sorted(p for p in path.rglob("*") if p.is_file()):
    digest.update(str(f.relative_to(path)).encode() + f.read_bytes())
  return digest.hexdigest()


@pytest.fixture(scope="module")
def relaxed_data(model, tmp_path_factory):
  dest = tmp_path_factory.mktemp("relaxed") / "data"
  before = _tree_digest(Path(SMOKE_DATASET))
  write_relaxed_targets(model, SMOKE_DATASET, dest, ["train"], relax.RelaxSettings(fmax=0.05, max_steps=300),
                        fingerprint="test", log=lambda _: None)
  assert _tree_digest(Path(SMOKE_DATASET)) == before  # the source is never modified
  return dest


def test_targets_are_converged_minima_of_the_learned_energy(model, relaxed_data):
  source, out = open_dataset(SMOKE_DATASET)["train"], open_dataset(relaxed_data)["train"]
  assert len(out) == len(source)
  summary = out.summary()
  assert set(summary["fidelity_tags"]["ref"]) == {RELAXED_TAG}
  eq = [i for i in range(len(source)) if source[i].is_equilibrium]
  with_target = [i for i in eq if out[i].ref_positions is not None]
  attrs = open_dataset(relaxed_data).attrs
  stats = attrs["relaxed_targets"]["splits"]["train"]
  assert stats["equilibrium"] == len(eq) and len(with_target) == stats["converged"] - stats["rejected"] > 0
  assert summary["labels"]["ref_positions"] == len(with_target)
  assert attrs["energy_model_fingerprint"] == "test" and attrs["relaxed_targets"]["fmax"] == 0.05
  for i in range(len(source)):  # every other field is the source's
    a, b = source[i], out[i]
    assert a.mol_id == b.mol_id and np.array_equal(a.positions, b.positions) and a.energy == b.energy
    assert (a.forces is None) == (b.forces is None) and a.is_equilibrium == b.is_equilibrium
    if not a.is_equilibrium:
      assert b.ref_positions is None
  sample = [source[i] for i in with_target[:8]]
  at_cheap = model.energy_and_forces(sample)
  at_min = model.energy_and_forces([r.replace(positions=out[i].ref_positions) for r, i in zip(sample, with_target)])
  for (e0, _), (e1, f1), i in zip(at_cheap, at_min, with_target):
    assert e1 < e0 and np.linalg.norm(f1, axis=1).max() < 0.05 + 1e-3
    assert e1 == pytest.approx(out[i].ref_energy, abs=1e-3)


def test_relaxed_form_trains_on_targets_and_refuses_other_references(workdir, relaxed_data, tmp_path):
  c = smoke_config(2)
  c.train.update(stage=2, init_from=str(workdir), init_mode="params")
  c.loss.update(optimality_weight=1.0, optimality_form="relaxed", optimality_noise=False,
                energy_weight=0.0, forces_weight=0.0)
  c.data.val_split = ""
  with pytest.raises(DatasetLabelError, match="no 'ref_positions' labels"):
    train_and_evaluate(c, tmp_path / "plain")  # the smoke data's train split has no references
  c.data.path = str(relaxed_data)
  summary = train_and_evaluate(c, tmp_path / "relaxed")
  assert summary["step"] == 2 and np.isfinite(summary["train"]["optimality_relaxed"])


def test_reproduction_writes_targets_once_per_energy_model_and_checks_given_ones(workdir, relaxed_data,
                                                                                 tmp_path, monkeypatch):
  from consist import reproduce  # pylint: disable=g-import-not-at-top
  from consist.reproduce import Reproduction, ReproduceError, load_config  # pylint: disable=g-import-not-at-top

  # The wiring is under test here, not the minima (above): short relaxations.
  monkeypatch.setattr(reproduce, "write_relaxed_targets", functools.partial(
      write_relaxed_targets, settings=relax.RelaxSettings(max_steps=10)))

  c = load_config(Path(__file__).resolve().parents[1] / "configs" / "reproduce_smoke.py")
  c.stage2.loss.update(optimality_form="relaxed", optimality_noise=False)
  c.reproduce.update(arms=("multitask", "consistency"), stage1_workdir=str(workdir))
  logged = []
  repro = Reproduction(c, tmp_path / "w", log=logged.append, show_progress=False)
  path = Path(repro._stage2_data_path(False, workdir))  # pylint: disable=protected-access
  assert path.parent == tmp_path / "w" / "data" and "-relaxed-" in path.name
  assert set(open_dataset(path)["train"].summary()["fidelity_tags"]["ref"]) <= {RELAXED_TAG}
  fingerprint = reproduce.energy_model_fingerprint(reproduce.TrainedModel.load(workdir).params)
  assert open_dataset(path).attrs["energy_model_fingerprint"] == fingerprint and fingerprint[:12] in path.name
  n_logged = len(logged)
  assert Path(repro._stage2_data_path(False, workdir)) == path and len(logged) == n_logged  # reused
  c.reproduce.relaxed_data = str(relaxed_data)  # written with fingerprint "test": another model's
  repro = Reproduction(c, tmp_path / "w2", log=lambda _: None, show_progress=False)
  with pytest.raises(ReproduceError, match="minima of another energy model"):
    repro._stage2_data_path(False, workdir)  # pylint: disable=protected-access
