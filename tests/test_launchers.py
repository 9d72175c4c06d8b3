"""Every launcher: --help exits 0; a user's mistake is one line naming the flag, exit 2, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = ("train", "convert", "inspect", "predict", "evaluate", "reproduce", "build_dataset",
             "relaxed_targets")


def launch(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
  env.pop("JAX_PLATFORMS", None)  # as a user runs it: JAX probes every backend, TPU included
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", f"launch.{name}", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def one_line_error(out: subprocess.CompletedProcess, prog: str) -> str:
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), out.stderr[-3000:]
  assert "Traceback" not in out.stderr and "\\n" not in out.stderr
  return lines[0]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_help_exits_zero(name):
  for flag in ("--help", "-h"):
    out = launch(name, flag)
    assert out.returncode == 0, (flag, out.returncode, out.stderr[-2000:])
    assert "python -m launch." in out.stdout + out.stderr  # the usage text (module docstring)


def test_train_config_and_flag_errors_are_one_line(tmp_path):
  smoke = ["--config=configs/smoke.py", f"--workdir={tmp_path / 'run'}"]
  out = launch("train", *smoke, "--config.train.stepz=2")
  assert out.returncode == 2
  line = one_line_error(out, "launch.train")
  assert "--config.train.stepz=2" in line and "unknown config key 'stepz'" in line and "steps" in line

  out = launch("train", *smoke, "--config.optim.learning_rate=-1", "--verbosity=0")
  assert out.returncode == 2
  assert "Unable to initialize backend 'tpu'" not in out.stderr  # even at INFO verbosity
  errors = [l for l in out.stderr.splitlines() if "error" in l]
  assert errors == ["launch.train: error: --config.optim.learning_rate=-1: must be positive, got -1.0"]

  (tmp_path / "file").write_text("")
  out = launch("train", "--config=configs/smoke.py", f"--workdir={tmp_path / 'file'}")
  assert out.returncode == 2 and "--workdir=" in one_line_error(out, "launch.train")
  assert "is a file" in out.stderr

  out = launch("train", *smoke, f"--config.data.path={tmp_path / 'no_data'}")
  assert out.returncode == 2 and "--config.data.path=" in one_line_error(out, "launch.train")
  assert "no such dataset" in out.stderr

  out = launch("train", "--config=configs/no_such_config.py", f"--workdir={tmp_path / 'run'}")
  assert out.returncode == 2 and "--config" in one_line_error(out, "launch.train")
  assert "no_such_config.py" in out.stderr

  out = launch("train", "--config=configs/smoke.py")
  assert out.returncode == 2 and "--workdir" in one_line_error(out, "launch.train")
  assert not (tmp_path / "run").exists()


def test_other_launchers_flag_errors_are_one_line(tmp_path):
  out = launch("convert", "--format=extxyz", f"--input={tmp_path / 'missing.xyz'}", f"--out={tmp_path / 'o'}")
  assert out.returncode == 2 and "--input=" in one_line_error(out, "launch.convert")
  out = launch("convert", "--format=xyz", "--input=x", "--out=y")
  assert out.returncode == 2 and "--format" in one_line_error(out, "launch.convert")
  out = launch("inspect", str(tmp_path), "--records=5:2")
  assert out.returncode != 0 and "Traceback" not in out.stderr
  out = launch("reproduce", "--config=configs/no_such_config.py", f"--workdir={tmp_path / 'r'}")
  assert out.returncode == 2 and "--config" in one_line_error(out, "launch.reproduce")
  out = launch("build_dataset")
  assert out.returncode == 2 and "nothing to do" in one_line_error(out, "launch.build_dataset")
  out = launch("relaxed_targets", f"--model={tmp_path / 'no_run'}", "--data=data/smoke", f"--out={tmp_path / 'o'}")
  assert out.returncode == 2 and "--model" in one_line_error(out, "launch.relaxed_targets")
  out = launch("relaxed_targets", "--model=models/pretrained", "--data=data/smoke", f"--out={tmp_path / 'o'}",
               "--fmax=0")
  assert out.returncode == 2 and "--fmax=0.0" in one_line_error(out, "launch.relaxed_targets")
  assert not (tmp_path / "o").exists()
