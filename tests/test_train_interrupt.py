"""Ctrl-C saves like SIGTERM and a re-run says what it does: resumes from step N, or is already
complete; the checkpoint records the charges / multiplicities the model was trained on."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_toy
from consist import checkpoint, metrics_log
from consist.train import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]


def _smoke(dataset, **train):
  spec = importlib.util.spec_from_file_location("configs_smoke", REPO / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(None)
  c.data.path = str(dataset)
  c.train.update(eval_every=0, log_every=1, **train)
  return c


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return train_toy.write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic")


@pytest.mark.slow
def test_sigint_saves_and_rerun_resumes_then_reports_complete(dataset, tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "run"
  write = metrics_log.MetricsLogger.write

  def write_then_ctrl_c(self, split, step, metrics):
    write(self, split, step, metrics)
    if split == "train" and step == 2:
      signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C, in the middle of the loop

  monkeypatch.setattr(metrics_log.MetricsLogger, "write", write_then_ctrl_c)
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the tests run as a background job
  try:
    out = train_and_evaluate(_smoke(dataset, steps=6, ckpt_every=100), workdir)
  except KeyboardInterrupt:
    pytest.fail("Ctrl-C raised KeyboardInterrupt instead of saving")
  monkeypatch.setattr(metrics_log.MetricsLogger, "write", write)
  assert out["interrupted"] and not out["preempted"] and 2 <= out["step"] < 6
  with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
    assert ckpt.latest_step() == out["step"]
    assert ckpt.meta(out["step"])["coverage"] == {"charges": [0], "multiplicities": [1]}
  err = capsys.readouterr().err
  assert f"interrupted (Ctrl-C): saved the checkpoint of step {out['step']}" in err
  assert signal.getsignal(signal.SIGINT) is before  # the handler is put back as it was

  resumed = train_and_evaluate(_smoke(dataset, steps=6, ckpt_every=100), workdir)
  err = capsys.readouterr().err
  assert resumed["step"] == 6 and not resumed["interrupted"]
  assert f"resuming from the checkpoint of step {out['step']} in {workdir}" in err

  again = train_and_evaluate(_smoke(dataset, steps=6, ckpt_every=100), workdir)
  err = capsys.readouterr().err
  assert again["step"] == 6 and "already complete (step 6 of 6)" in err and "from step 6 to 6" not in err


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_saves_one_line_exit_130(dataset, tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.train", "--config=configs/smoke.py", f"--workdir={workdir}",
       f"--config.data.path={dataset}", "--config.train.steps=100000", "--config.train.ckpt_every=2",
       "--config.train.eval_every=0", "--config.train.log_every=1"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and not list((workdir / "checkpoints").glob("[0-9]*")):
    time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=240)
  assert proc.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  assert "interrupted (Ctrl-C): saved the checkpoint of step" in stderr
  assert '"interrupted": true' in stdout
  with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
    assert ckpt.latest_step() > 0
