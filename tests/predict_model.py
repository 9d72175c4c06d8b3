"""A smoke model trained once per test session for the prediction and calculator tests (a few
steps, two shape buckets). pytest-xdist workers share it: the first to take the lock trains it
(the pattern of pytest-xdist's docs, "Making session-scoped fixtures execute only once")."""

import fcntl
import importlib.util
from pathlib import Path

import pytest

from consist.data.bundled import SMOKE_DATASET
from consist.inference import TrainedModel
from consist.train import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]


def smoke_config(steps: int):
  spec = importlib.util.spec_from_file_location("configs_smoke", REPO / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(None)
  c.data.path = str(SMOKE_DATASET)
  c.data.num_buckets = 2
  c.train.update(steps=steps, eval_every=0, ckpt_every=steps, log_every=steps)
  # Enough training that the energy model's forces have the scale of the labels (an untrained
  # MACE-class model's forces are ~0.02 eV/Å): relaxation and force-sign tests need them.
  c.optim.update(learning_rate=1e-2, warmup_steps=2)
  return c


def train_smoke_model(workdir: Path, steps: int = 40) -> Path:
  """Trains the smoke config on data/smoke for `steps` steps into `workdir`; returns it."""
  train_and_evaluate(smoke_config(steps), workdir)
  return workdir


def shared_smoke_model(tmp_path_factory) -> Path:
  """Workdir of the session's smoke model, trained by whichever test process gets here first."""
  root = tmp_path_factory.getbasetemp()
  if root.name.startswith("popen-gw"):  # an xdist worker: its siblings share the parent directory
    root = root.parent
  workdir = root / "predict_smoke_model"
  with open(root / "predict_smoke_model.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "done").exists():
      train_smoke_model(workdir)
      (workdir / "done").write_text("")
  return workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """The session's smoke model (trained once, shared by xdist workers)."""
  return shared_smoke_model(tmp_path_factory)


@pytest.fixture(scope="module")
def model(workdir):  # pylint: disable=redefined-outer-name
  return TrainedModel.load(workdir)
