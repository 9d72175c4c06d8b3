"""Prediction throughput against the quantum chemistry it replaces, measured in one run.

On molecules of the bundled test split, from their MMFF94 structures (the records' own positions):
  refine, denoise (one-step de novo), ddim (de novo with the sampler's defaults), ddim_one_sample
  (de novo as one plain ancestral sample: 200 steps, noise scale 1, no consensus):
  `TrainedModel.sample`;
  relax, relax_fire, relax_lbfgs: `TrainedModel.relax` (a refilled batch on a radius graph,
    `consist.relax.StreamRelaxer`) on the learned energy to `RELAX_FMAX` eV/Å: BFGS from Lindh's
    model Hessian (the default), FIRE, L-BFGS; with steps and energy evaluations per molecule and
    the batch occupancy (molecule-evaluations / batch slots x loop iterations);
  gfn2_xtb_relax: GFN2-xTB relaxation (tblite through ASE BFGS, `XTB_FMAX` eV/Å) in `workers`
    spawned processes with one OpenMP thread each, warmed up before the clock starts.
Each model mode runs twice over the same molecules: the first pass compiles every shape bucket it
meets (`compile_s` = first - second), the second is the steady state (`molecules_per_s`). Ratios are
model molecules/s over GFN2-xTB molecules/s.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from consist.data.bundled import BUNDLED_DATASET, PRETRAINED_MODEL
from consist.eval import physics
from consist.relax import RelaxSettings

RELAX_FMAX = 0.05
XTB_FMAX = 0.01
XTB_LEVEL = "gfn2-xtb"


def _xtb_relax(job) -> tuple[float, bool, int]:
  """Worker: (seconds, converged, steps) of one GFN2-xTB relaxation."""
  from consist.levels import LevelError, get_level  # pylint: disable=g-import-not-at-top

  z, positions, charge, multiplicity, bonds = job
  t0 = time.perf_counter()
  try:
    result = get_level(XTB_LEVEL).relax(z, positions, charge, multiplicity, bonds, fmax=XTB_FMAX,
                                        max_steps=1000)
  except LevelError:
    return time.perf_counter() - t0, False, -1
  return time.perf_counter() - t0, result.converged, result.n_steps


def _warm(_) -> None:
  """Worker warm-up: loads tblite and runs one water single point."""
  from consist.levels import get_level  # pylint: disable=g-import-not-at-top

  get_level(XTB_LEVEL).energy_forces(np.array([8, 1, 1]),
                                     np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]))
  time.sleep(0.5)  # keep this worker busy so every worker gets one warm-up


def xtb_throughput(records, workers: int) -> dict:
  """GFN2-xTB relaxations of `records` from their positions in `workers` single-threaded processes."""
  with physics.single_threaded_env():
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    list(pool.map(_warm, range(workers)))
  jobs = [(r.atomic_numbers, r.positions, r.charge, r.multiplicity, r.bonds) for r in records]
  with pool:
    t0 = time.perf_counter()
    out = list(pool.map(_xtb_relax, jobs))
    wall = time.perf_counter() - t0
  return {"molecules": len(records), "workers": workers, "threads_per_worker": 1, "fmax": XTB_FMAX,
          "wall_s": wall, "molecules_per_s": len(records) / wall,
          "mean_s_per_molecule_one_process": float(np.mean([s for s, _, _ in out])),
          "converged_frac": float(np.mean([c for _, c, _ in out])),
          "mean_steps": float(np.mean([n for _, c, n in out if n >= 0] or [np.nan]))}


def _twice(fn, n: int) -> dict:
  """Compile (first pass minus second) and steady-state throughput of fn() over n molecules."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = fn()
  steady = time.perf_counter() - t0
  return {"first_pass_s": first, "steady_s": steady, "compile_s": max(first - steady, 0.0),
          "molecules_per_s": n / steady, "_out": out}


def run(quick: bool, workdir: str | Path | None = None, data: str | Path | None = None,
        molecules: int | None = None, workers: int | None = None) -> dict:
  """The predict suite (see the module docstring). workdir: a trained run (default the bundled
  models/pretrained); molecules: how many of the test split (evenly spaced; default 16 quick, 128)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from consist.eval import run as eval_run  # pylint: disable=g-import-not-at-top (imports jax)

  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  from consist.inference import Sampling, load_model  # pylint: disable=g-import-not-at-top

  workdir = Path(workdir or PRETRAINED_MODEL)
  data = Path(data or BUNDLED_DATASET)
  n = molecules or (16 if quick else 128)
  workers = workers or min(2, os.cpu_count() or 1)
  records = eval_run.evaluation_records(eval_run.open_split(data, "test"), where=f"{data} test",
                                        max_molecules=n)
  t0 = time.perf_counter()
  model = load_model(workdir)
  load_s = time.perf_counter() - t0
  modes = {
      "refine": Sampling(mode="refine"),
      "denoise": Sampling(mode="denoise"),
      "ddim": Sampling(mode="ddim"),
      "ddim_one_sample": Sampling(mode="ddim", steps=200, noise_scale=1.0, candidates=1),
  }
  result: dict = {
      "workdir": str(workdir.resolve()), "step": model.step, "data": f"{data} (test split)",
      "molecules": len(records), "mean_atoms": float(np.mean([r.n_atoms for r in records])),
      "buckets": model.buckets.to_json(), "load_s": load_s, "modes": {},
  }
  for name, sampling in modes.items():
    timing = _twice(lambda s=sampling: model.sample(records, s), len(records))
    timing.pop("_out")
    resolved = model.resolve(sampling)
    result["modes"][name] = {"sampling": {"mode": sampling.mode, "steps": sampling.steps, "eta": sampling.eta,
                                          "noise_scale": sampling.noise_scale,
                                          "candidates": sampling.candidates, "level": resolved.level,
                                          "t_star": resolved.t_star}, **timing}
  stream = model._stream  # pylint: disable=protected-access
  for name, method in (("relax", "bfgs"), ("relax_fire", "fire"), ("relax_lbfgs", "lbfgs")):
    settings = RelaxSettings(method=method, fmax=RELAX_FMAX, max_steps=500)

    def relax_pass(s=settings):
      stream.stats = {k: 0 for k in stream.stats}
      return model.relax(records, s)

    timing = _twice(relax_pass, len(records))
    relaxed = timing.pop("_out")
    stats = dict(stream.stats)  # of the steady (second) pass
    result["modes"][name] = {
        "settings": {"method": settings.method, "hessian": settings.hessian,
                     "lindh_shift": settings.lindh_shift, "fmax": settings.fmax,
                     "max_steps": settings.max_steps},
        "batch": {"graphs": stream.graphs, "cutoff": stream.cutoff, "skin": stream.skin,
                  "shape": dataclasses.asdict(stream.shape_for(records))},
        **timing, "converged_frac": float(np.mean([r.converged for r in relaxed])),
        "mean_steps": float(np.mean([r.steps for r in relaxed])),
        "mean_evaluations": float(np.mean([r.evaluations for r in relaxed])),
        "max_steps_taken": int(max(r.steps for r in relaxed)),
        "mean_energy": float(np.mean([r.energy for r in relaxed])),
        "occupancy": sum(r.evaluations for r in relaxed) / max(stats["slot_capacity"], 1),
        "loop_calls": stats["calls"], "neighbour_rebuilds": stats["rebuilds"],
        "loop_s": stats["loop_s"]}
  xtb = xtb_throughput(records[:max(len(records) // 2, 8)] if quick else records, workers)
  result["gfn2_xtb_relax"] = xtb
  result["ratio_over_gfn2_xtb_relax"] = {name: m["molecules_per_s"] / xtb["molecules_per_s"]
                                         for name, m in result["modes"].items()}
  return result
