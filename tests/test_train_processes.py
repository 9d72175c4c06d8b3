"""Real processes: SIGKILL + resume reproduces the uninterrupted run, SIGTERM checkpoints the current
step, and 2 processes over gloo match one process (all slow: each launches `python -m launch.train`)."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import train_toy

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return train_toy.write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic")


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _cmd(dataset, workdir, *overrides, config="configs/smoke.py"):
  return [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
          f"--config.data.path={dataset}", "--config.train.eval_every=0", "--config.train.log_every=1",
          *overrides]


def _run(cmd, devices=2, timeout=300):
  out = subprocess.run(cmd, cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _train_lines(workdir):
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [d for d in map(json.loads, path.read_text().splitlines()) if d["split"] == "train"]


def _summary(stdout: str) -> dict:
  line = [l for l in stdout.splitlines() if l.startswith("summary ")][-1]
  return json.loads(line[len("summary "):])


def test_sigkill_then_resume_equals_uninterrupted_run(dataset, tmp_path):
  steps = ["--config.train.steps=14", "--config.train.ckpt_every=3"]
  _run(_cmd(dataset, tmp_path / "ref", *steps))
  reference = {d["step"]: d["loss"] for d in _train_lines(tmp_path / "ref")}
  assert sorted(reference) == list(range(1, 15))

  kill_at = random.Random().randint(5, 11)
  proc = subprocess.Popen(_cmd(dataset, tmp_path / "run", *steps), cwd=REPO, env=_env(2),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    # Checkpoints are saved asynchronously: kill only once one is finalised (a digit-named step
    # directory), so that the run really resumes from a checkpoint, at a random later step.
    while (max([d["step"] for d in _train_lines(tmp_path / "run")] or [0]) < kill_at
           or not _finalised_steps(tmp_path / "run")):
      assert proc.poll() is None, "the run ended before it could be killed"
      assert time.time() < deadline, "no progress"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  before = _train_lines(tmp_path / "run")
  _run(_cmd(dataset, tmp_path / "run", *steps))
  after = _train_lines(tmp_path / "run")[len(before):]
  resumed_from = after[0]["step"] - 1
  assert resumed_from >= 3 and resumed_from % 3 == 0, f"killed at {kill_at}, resumed from {resumed_from}"
  assert [d["step"] for d in after] == list(range(resumed_from + 1, 15))
  # Same data order, same RNG: bit-identical losses from the checkpoint on.
  assert [d["loss"] for d in after] == [reference[d["step"]] for d in after], (kill_at, resumed_from)


def _finalised_steps(workdir: Path) -> list[int]:
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def test_sigterm_checkpoints_current_step(dataset, tmp_path):
  proc = subprocess.Popen(_cmd(dataset, tmp_path / "run", "--config.train.steps=500",
                               "--config.train.ckpt_every=1000"),
                          cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while max([d["step"] for d in _train_lines(tmp_path / "run")] or [0]) < 3:
      assert proc.poll() is None and time.time() < deadline
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, stderr[-3000:]
  summary = _summary(stdout)
  assert summary["preempted"] and 3 <= summary["step"] < 500
  assert _finalised_steps(tmp_path / "run") == [summary["step"]]
  assert "preempted (SIGTERM): saved the checkpoint of step" in stderr


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_over_gloo_match_one_process(dataset, tmp_path):
  """2 processes x 2 CPU devices (each reading only its slice) vs 1 process x 4 devices."""
  flags = ["--config.train.steps=4", "--config.train.ckpt_every=2", "--config.train.eval_every=2"]
  single = _run(_cmd(dataset, tmp_path / "single", *flags), devices=4)
  port = _free_port()
  procs = [subprocess.Popen(_cmd(dataset, tmp_path / "multi", *flags, "--jax_distributed",
                                 f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                 f"--process_id={i}"),
                            cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=400))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  a, b = _summary(single.stdout), _summary(outs[0][0])
  assert "summary" not in outs[1][0]  # only process 0 reports
  ref = _train_lines(tmp_path / "single")
  multi = _train_lines(tmp_path / "multi")
  assert [d["step"] for d in multi] == [1, 2, 3, 4]
  # Same global batches; the all-reduce runs over gloo instead of in-process: float32 reduction order
  # may differ, so rtol 1e-5.
  np.testing.assert_allclose([d["loss"] for d in multi], [d["loss"] for d in ref], rtol=1e-5)
  np.testing.assert_allclose(b["val"]["loss"], a["val"]["loss"], rtol=1e-5)
  assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
