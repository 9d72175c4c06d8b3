"""Energy benchmark: the energy model trained for a wall-clock budget, evaluated on the test split.

  python -m launch.bench --only energy [--budget_s 1500] [--peer mace] [--peer_python PY]

Trains `configs/energy.py` on the bundled train split so that the training loop (compilation
included) fills `budget_s`: a short calibration run from scratch (not counted, like the peer's data
preparation) measures seconds per step, and the real run gets `steps = budget / (s/step)`, so its
learning-rate schedule ends with the budget. Then, at the test split's MMFF94 structures (GFN2-xTB
labels): force RMSE over all components (eV/Å), the labels' RMS, energy MAE per atom (eV/atom), and
energy+forces inference structures/s (after compilation). With `peer="mace"`, PyTorch MACE
(`consist/bench/peer_mace.py`, issue 12's configuration) trains for the same budget on the same data
in the same run, and the result holds both rows and the ratios consist / MACE.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from consist.data.bundled import BUNDLED_DATASET

REPO = Path(__file__).resolve().parents[2]
CALIBRATION_STEPS = 30


def _config(steps: int, quick: bool):
  from consist.reproduce import load_config  # pylint: disable=g-import-not-at-top
  c = load_config(REPO / "configs" / "energy.py")
  c.train.update(steps=steps, eval_every=0, ckpt_every=steps, log_every=max(steps // 20, 1))
  if quick:  # a smoke check of the benchmark itself: small model
    c.model.energy.update(channels=8, radial_hidden=(16,), readout_hidden=8)
  return c


def evaluate(workdir: str | Path, split: str = "test", data: str | Path = BUNDLED_DATASET,
             limit: int | None = None) -> dict:
  """Force RMSE / labels' RMS (eV/Å), energy MAE per atom (eV/atom) and energy+forces
  structures/s of the run in `workdir` on `split` (records with both labels)."""
  from consist.data.store import open_dataset  # pylint: disable=g-import-not-at-top
  from consist.inference import load_model  # pylint: disable=g-import-not-at-top

  store = open_dataset(str(data))[split]
  records = [store[i] for i in range(len(store) if limit is None else min(limit, len(store)))]
  records = [r for r in records if r.energy is not None and r.forces is not None]
  model = load_model(workdir)
  model.energy_and_forces(records)  # compiles every bucket the split needs
  t0 = time.perf_counter()
  out = model.energy_and_forces(records)
  infer_s = time.perf_counter() - t0
  f_err = np.concatenate([(f - r.forces).ravel() for (_, f), r in zip(out, records)])
  f_lab = np.concatenate([np.asarray(r.forces, np.float64).ravel() for r in records])
  e_err = np.array([abs(e - r.energy) / r.n_atoms for (e, _), r in zip(out, records)])
  return {"split": split, "structures": len(records),
          "force_rmse": float(np.sqrt(np.mean(f_err**2))),
          "label_force_rms": float(np.sqrt(np.mean(f_lab**2))),
          "energy_mae_per_atom": float(np.mean(e_err)),
          "infer_structures_per_s": len(records) / infer_s}


def train_for_budget(workdir: Path, budget_s: float, quick: bool) -> dict:
  """Calibrates seconds per step, then trains `configs/energy.py` in `workdir` for `budget_s`."""
  from consist.train import train_and_evaluate  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    cal = train_and_evaluate(_config(CALIBRATION_STEPS, quick), tmp)
  s_per_step = (cal["loop_s"] - cal["compile_s"]) / max(CALIBRATION_STEPS - cal["compiles"], 1)
  steps = max(int((budget_s - cal["compile_s"]) / s_per_step), 10)
  print(f"[bench energy] calibration: {s_per_step:.3f} s/step, compile {cal['compile_s']:.1f} s "
        f"-> {steps} steps for {budget_s:.0f} s", flush=True)
  summary = train_and_evaluate(_config(steps, quick), workdir)
  return {"steps": steps, "calibration_s_per_step": s_per_step, "train_loop_s": summary["loop_s"],
          "compile_s": summary["compile_s"], "train_structures_per_s": summary["structures_per_s"],
          "train_wall_s": summary["wall_s"]}


def run(quick: bool, budget_s: float | None = None, peer: str | None = None,
        peer_python: str | None = None, workdir: str | Path | None = None) -> dict:
  """The energy suite. budget_s: training wall-clock budget (default 1500 s, quick 60 s); peer:
  None or "mace"; workdir: where the consist run is kept (default a temporary directory)."""
  budget = float(budget_s or (60.0 if quick else 1500.0))
  if peer not in (None, "", "mace"):
    raise ValueError(f"--peer: unknown peer {peer!r}; the only peer is 'mace'")
  threads = os.cpu_count() or 1
  result: dict = {"budget_s": budget, "threads": threads}
  with tempfile.TemporaryDirectory() as tmp:
    run_dir = Path(workdir) if workdir else Path(tmp) / "energy"
    train = train_for_budget(run_dir, budget, quick)
    result["consist"] = train | evaluate(run_dir, limit=64 if quick else None)
    if peer == "mace":
      from consist.bench import peer_data  # pylint: disable=g-import-not-at-top
      npz = str(Path(tmp) / "energy_data.npz")
      peer_data.export_energy_data(str(BUNDLED_DATASET), npz,
                                   max_train=500 if quick else None)
      result["mace"] = peer_data.run_peer_mace(npz, budget, threads, python=peer_python,
                                               out_json=str(Path(tmp) / "mace.json"))
      c, m = result["consist"], result["mace"]
      result["ratios"] = {
          "force_rmse": c["force_rmse"] / m["force_rmse"],
          "energy_mae_per_atom": c["energy_mae_per_atom"] / m["energy_mae_per_atom"],
          "train_structures_per_s": c["train_structures_per_s"] / m["train_structures_per_s"],
          "infer_structures_per_s": c["infer_structures_per_s"] / m["infer_structures_per_s"]}
  return result
