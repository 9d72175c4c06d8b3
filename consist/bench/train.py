"""Train-step benchmark: stage 1 vs stage 2 throughput, compiles per run, padding, device scaling.

Every measurement is a real `python -m launch.train` run of the smoke config (eval off, no
intermediate checkpoints) in a subprocess with its own `--xla_force_host_platform_device_count`, on
the smoke dataset if it is built, else on a dataset of the synthetic world written to a temporary
directory. Throughput counts only steps that did not compile (see `consist.train`). Simulated CPU
devices share the machine's cores: the scaling numbers measure the data-parallel overhead, not a
speed-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from consist.data.bundled import REPO_ROOT, SMOKE_DATASET

BUCKETS = 3  # shape buckets of the benchmark runs (the smoke config itself uses 1)


def _synthetic_dataset(path: Path) -> Path:
  from consist import synthetic  # noqa: PLC0415
  from consist.data.store import DatasetWriter  # noqa: PLC0415

  world = synthetic.make_world(seed=0)
  train = world.equilibrium_records() + world.off_equilibrium_records(20, np.random.default_rng(0))
  with DatasetWriter(path, attrs={"source": "consist.bench.train: synthetic world"}) as writer:
    for name, records in (("train", train), ("val", world.equilibrium_records())):
      split = writer.split(name)
      for i, record in enumerate(records):
        split.append(record, where=f"{name}[{i}]")
  return path


def _train(data: Path, workdir: Path, devices: int, steps: int, *overrides: str, arg: str = "") -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "launch.train", f"--config=configs/smoke.py{':' + arg if arg else ''}",
         f"--workdir={workdir}", f"--config.data.path={data}", f"--config.train.steps={steps}",
         "--config.train.eval_every=0", f"--config.train.ckpt_every={steps}", f"--config.train.log_every={steps}",
         f"--config.data.num_buckets={BUCKETS}", *overrides]
  out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"benchmark run failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
  summary = json.loads([l for l in out.stdout.splitlines() if l.startswith("summary ")][-1][len("summary "):])
  keys = ("structures_per_s", "atoms_per_s", "padding_efficiency", "compiles", "buckets", "compile_s", "loop_s")
  return {"devices": devices, "steps": steps, **{k: summary[k] for k in keys}}


def run(quick: bool) -> dict:
  steps = 12 if quick else 40
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    data = SMOKE_DATASET if (SMOKE_DATASET / "dataset.json").exists() else _synthetic_dataset(tmp / "data")
    stage1 = _train(data, tmp / "s1", 1, steps)
    stage2 = _train(data, tmp / "s2", 1, steps, f"--config.train.init_from={tmp / 's1'}", arg="stage2")
    scaling = [stage1] + [_train(data, tmp / f"d{d}", d, steps) for d in ((8,) if quick else (2, 4, 8))]
  base = scaling[0]["structures_per_s"]
  for row in scaling:
    row["speedup_vs_1"] = row["structures_per_s"] / base if base else float("nan")
  return {
      "dataset": str(data) if data == SMOKE_DATASET else "synthetic world (consist.synthetic)",
      "config": f"configs/smoke.py, graphs_per_device 4, {BUCKETS} shape buckets, eval off",
      "stage1": stage1,
      "stage2": stage2,
      "stage2_over_stage1_time_per_structure": (stage1["structures_per_s"] / stage2["structures_per_s"]
                                                if stage2["structures_per_s"] else float("nan")),
      "compiles_per_run": {row_name: {"compiles": row["compiles"], "buckets": row["buckets"]}
                           for row_name, row in (("stage1", stage1), ("stage2", stage2))},
      "scaling_simulated_cpu_devices": scaling,
  }
